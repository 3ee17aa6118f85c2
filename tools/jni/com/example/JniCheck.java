package com.example;

import java.io.BufferedReader;
import java.io.InputStreamReader;

/** A stand-in VpnService for tools/jni/jni_check.py: loads the JNI glue,
 *  starts a handle on an inherited packet fd, reads the reader thread's
 *  commands from stdin ("status", "stop") and answers on stdout. */
public final class JniCheck {
    public static final class Service {               // VpnService.protect(int) stand-in
        public volatile int calls;
        public boolean protect(int fd) {
            calls++;
            System.out.println("protect " + fd);
            return false;                              // refused: that dial must fail
        }
    }

    public static void main(String[] args) throws Exception {
        System.load(args[0]);
        String profile = new String(java.nio.file.Files.readAllBytes(java.nio.file.Paths.get(args[1])));
        int fd = Integer.parseInt(args[2]);
        T2x t2x = new T2x();
        Service svc = new Service();
        int handle = t2x.start(svc, profile, fd);
        if (handle <= 0) {
            System.out.println("start failed: " + t2x.lastError());
            System.exit(1);
        }
        Thread reader = new Thread(() -> t2x.run(handle, fd), "t2x-reader");
        reader.start();
        System.out.println("started " + handle);
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in));
        for (String line; (line = in.readLine()) != null; ) {
            if (line.equals("status")) {
                System.out.println("status " + t2x.message(handle, "{\"op\":\"status\"}"));
            } else if (line.equals("bad")) {
                System.out.println("bad " + t2x.message(handle, "{\"op\":\"fly\"}") + " " + t2x.lastError());
            } else if (line.equals("stop")) {
                int rc = t2x.stop(handle);
                reader.join(5000);
                System.out.println("stopped " + rc + " reader_alive=" + reader.isAlive() + " protect_calls=" + svc.calls);
                return;
            }
        }
    }
}
