"""Coverage-guided fuzz targets (atheris) for tun2xray and netstack.

    python3 -m tools.fuzz TARGET --seconds N     # fuzz one target (needs atheris)
    python3 -m tools.fuzz all --seconds N        # each target N seconds in turn
    python3 -m tools.fuzz TARGET --replay FILE…  # run inputs through the target, no atheris needed
    python3 -m tools.fuzz seeds [--out DIR]      # write the seed corpora

Each target is a module of this package with TestOneInput(data) (and
seeds(), the starting corpus).  Regression inputs live in
tests/fuzz_corpus/TARGET/ and tests/test_fuzz_regressions.py replays them.
"""

TARGETS = ("stack", "wire", "pcap", "socks", "config", "bridge", "dns")
