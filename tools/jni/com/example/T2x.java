package com.example;

/** The Java twin of the Kotlin {@code object T2x} in docs/embedding-c.md:
 *  the same native methods, bound to tools/jni/t2x_jni.c. */
public final class T2x {
    public native int start(Object service, String profileJson, int tunFd);
    public native void run(int handle, int tunFd);     // blocks: the reader thread's body
    public native String message(int handle, String requestJson);
    public native int stop(int handle);
    public native String lastError();
}
