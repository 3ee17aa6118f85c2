/* abi_dlopen LIBRARY PROFILE_JSON: load libtun2xray as Java's System.load,
 * Android's loadLibrary and Swift's dlopen do (RTLD_LOCAL, not linked in),
 * start a handle, ask its status and stop it (tests/test_abi.py). */
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>

int main(int argc, char **argv)
{
    if (argc != 3)
        return 2;
    void *lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        printf("dlopen: %s\n", dlerror());
        return 1;
    }
    int32_t (*start)(const char *, void *, void *) = (int32_t (*)(const char *, void *, void *))dlsym(lib, "t2x_start");
    int32_t (*message)(int32_t, const char *, char *, size_t) =
        (int32_t (*)(int32_t, const char *, char *, size_t))dlsym(lib, "t2x_message");
    int32_t (*stop)(int32_t) = (int32_t (*)(int32_t))dlsym(lib, "t2x_stop");
    const char *(*last_error)(void) = (const char *(*)(void))dlsym(lib, "t2x_last_error");
    int32_t h = start(argv[2], NULL, NULL);
    if (h <= 0) {
        printf("t2x_start: %s\n", last_error());
        return 1;
    }
    char reply[64];
    int32_t n = message(h, "{\"op\":\"reset_flows\"}", reply, sizeof reply);
    printf("%d %s %d\n", h, n > 0 ? reply : last_error(), stop(h));
    return 0;
}
