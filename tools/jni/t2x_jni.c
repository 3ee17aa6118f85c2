#include <jni.h>
#include <poll.h>
#include <stdint.h>
#include <unistd.h>
#include "tun2xray.h"

static JavaVM *g_vm;
static jobject g_service;                      /* the VpnService, a global ref */
static jmethodID g_protect;                    /* boolean VpnService.protect(int) */
static volatile int g_room = 1;                /* 0 while the library holds our reads back */
static volatile int g_stop;                    /* stop() began: the reader returns */

jint JNI_OnLoad(JavaVM *vm, void *reserved) { (void)reserved; g_vm = vm; return JNI_VERSION_1_6; }

static void on_outbound(void *ctx, const uint8_t *const *p, const size_t *len, const int32_t *fam, size_t n) {
    int fd = (int)(intptr_t)ctx;
    (void)fam;                                 /* 2 or 10: the numbers we submitted */
    if (n == 0) { g_room = 1; return; }        /* the resume signal */
    for (size_t i = 0; i < n; i++)
        if (write(fd, p[i], len[i]) < 0) { /* a full TUN drops it; TCP resends */ }
}

static int32_t protect(void *ctx, int32_t fd) {                /* on the engine thread */
    JNIEnv *env;
    (void)ctx;
    int attached = (*g_vm)->GetEnv(g_vm, (void **)&env, JNI_VERSION_1_6) == JNI_EDETACHED;
    if (attached && (*g_vm)->AttachCurrentThread(g_vm, (void **)&env, NULL) != JNI_OK)
        return -1;
    jboolean ok = (*env)->CallBooleanMethod(env, g_service, g_protect, fd);
    if (attached)                              /* the engine thread is not Java's: never */
        (*g_vm)->DetachCurrentThread(g_vm);    /* leave it attached (ART aborts on exit) */
    return ok ? 0 : -1;
}

JNIEXPORT jint JNICALL Java_com_example_T2x_start(JNIEnv *env, jobject self, jobject svc, jstring profile,
                                                  jint fd) {
    (void)self;
    const char *json = (*env)->GetStringUTFChars(env, profile, NULL);
    g_service = (*env)->NewGlobalRef(env, svc);
    g_protect = (*env)->GetMethodID(env, (*env)->GetObjectClass(env, svc), "protect", "(I)Z");
    g_stop = 0;
    t2x_set_protect(0, protect, NULL);         /* from the engine's first socket on */
    int32_t h = t2x_start(json, on_outbound, (void *)(intptr_t)fd);
    (*env)->ReleaseStringUTFChars(env, profile, json);
    return h;
}

JNIEXPORT void JNICALL Java_com_example_T2x_run(JNIEnv *env, jobject self, jint h, jint fd) {
    static uint8_t buf[64][65536];
    const uint8_t *pkts[64]; size_t lens[64]; int32_t fams[64];
    (void)env; (void)self;
    while (!g_stop) {
        struct pollfd pfd = { fd, POLLIN, 0 };
        if (poll(&pfd, 1, 200) < 0) return;
        size_t n = 0;
        ssize_t r;
        while (n < 64 && (pfd.revents & POLLIN) && (r = read(fd, buf[n], sizeof buf[n])) > 0) {
            pkts[n] = buf[n]; lens[n] = (size_t)r;
            fams[n] = (buf[n][0] >> 4) == 6 ? 10 : 2;          /* Android numbers: AF_INET6 is 10 */
            n++;
            if (n < 64 && poll(&pfd, 1, 0) <= 0) break;        /* no more waiting: submit what we have */
        }
        for (size_t done = 0; done < n && !g_stop;) {
            g_room = 0;
            int32_t k = t2x_submit_inbound_batch(h, pkts + done, lens + done, fams + done, n - done);
            if (k < 0) return;                 /* the handle was stopped */
            done += (size_t)k;
            for (int w = 0; done < n && !g_room && w < 50; w++)  /* withhold reads until the resume */
                usleep(1000);                                   /* signal (or retry after 50 ms) */
        }
    }
}

JNIEXPORT jstring JNICALL Java_com_example_T2x_message(JNIEnv *env, jobject self, jint h, jstring req) {
    static char reply[256 * 1024];             /* one caller at a time, or make it per call */
    (void)self;
    const char *json = (*env)->GetStringUTFChars(env, req, NULL);
    int32_t n = t2x_message(h, json, reply, sizeof reply);
    (*env)->ReleaseStringUTFChars(env, req, json);
    return n < 0 || n >= (int32_t)sizeof reply ? NULL : (*env)->NewStringUTF(env, reply);
}

JNIEXPORT jint JNICALL Java_com_example_T2x_stop(JNIEnv *env, jobject self, jint h) {
    (void)self;
    g_stop = 1;                                /* the reader leaves its loop */
    int32_t r = t2x_stop(h);                   /* callbacks are done when it returns */
    if (g_service) { (*env)->DeleteGlobalRef(env, g_service); g_service = NULL; }
    return r;
}

JNIEXPORT jstring JNICALL Java_com_example_T2x_lastError(JNIEnv *env, jobject self) {
    (void)self;
    return (*env)->NewStringUTF(env, t2x_last_error());
}
