/*
 * ssm_cudasim.h -- the host side of ssm's CUDA simulator: what a .cu file needs from the
 * CUDA compiler and the GPU, for the host C++ compiler (C++17), plus the launcher.
 *
 * Design
 * ------
 * a) ssm/testing/cudasim/_module.py builds one shared library per module from the exact
 *    text ssm._gpu hands to NVRTC: this header, then the .cu text (with its `__shared__`
 *    arrays declared as race-checked `shared_array`s and its PTX half conversions as calls
 *    below: the only rewrites), then a table of the module's instantiations (its
 *    name_expressions), each described by the parameter types of the instantiated template
 *    (`describe`), so that launches are checked against the real parameter list.
 * b) A launch runs the grid one block at a time. A block's threads are fibers on one OS
 *    thread, scheduled cooperatively: each runs until it reaches a synchronisation point
 *    (`__syncthreads`, a warp shuffle, `__syncwarp`) or exits; then the scheduler resolves
 *    the warps' shuffles (every lane of each mask must be there, at the same shuffle) or
 *    releases the barrier (every thread of the block must be there, at the same barrier).
 *    Any other state is a violation. Fibers switch with a few instructions of assembly on
 *    x86-64 (ucontext elsewhere: it makes a system call per switch, so it is slow).
 * c) A violation stops the launch: the fiber switches back to the scheduler, which
 *    abandons the block and returns an error naming kernel, block, thread and what
 *    happened. A memory fault (an access outside every mapped allocation: device arrays
 *    end at a guard page, see _memory.py) is caught by a SIGSEGV/SIGBUS handler installed
 *    for the launch only, which jumps back to the launcher; Python names the allocation.
 * d) Numerics: float denormals flush to zero (MXCSR FTZ+DAZ) in kernels that compute in
 *    float, as -ftz=true does on the GPU; x86 has a single flush mode, so the double
 *    arithmetic of those kernels (partial sums) flushes too. FMA contraction follows the
 *    compile options (-ffp-contract, with -mfma where the CPU has it).
 * e) Traffic (the build with SSM_SIM_TRAFFIC=1, compiled with -fsanitize=kernel-address and
 *    outlined checks, whose hooks are defined below): every load and store of a kernel
 *    that falls in a device allocation passed to the launch is attributed to a warp-wide
 *    request, keyed by (warp, instruction, sync interval, n-th execution by the lane since
 *    the lane's last warp op or barrier); a request touches the 32-byte sectors its lanes'
 *    bytes fall in, as a GPU's memory system would move them.
 */
#ifndef SSM_CUDASIM_H
#define SSM_CUDASIM_H

#include <cmath>
#include <csetjmp>
#include <csignal>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>
#if defined(__x86_64__) && defined(__ELF__)  /* the switch below is SysV x86-64, ELF */
#include <ucontext.h>
#include <xmmintrin.h>
#define SSM_SIM_ASM_SWITCH 1
#else
#include <ucontext.h>
#define SSM_SIM_ASM_SWITCH 0
#endif
#ifndef SSM_SIM_TRAFFIC
#define SSM_SIM_TRAFFIC 0
#endif
/* The traffic build (see below) uses GCC's kernel-address instrumentation as a hook on
   every memory access, which also defines __SANITIZE_ADDRESS__: it is not ASan. */
#if defined(__SANITIZE_ADDRESS__) && !SSM_SIM_TRAFFIC
#define SSM_SIM_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SSM_SIM_ASAN 1
#endif
#endif
#ifndef SSM_SIM_ASAN
#define SSM_SIM_ASAN 0
#endif
#if SSM_SIM_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

/* ---- CUDA C++ spellings ------------------------------------------------------------ */

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static
#define warpSize 32

struct uint3 { unsigned int x, y, z; };
struct dim3 {
    unsigned int x, y, z;
    dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline float __int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
inline int __float_as_int(float v) { int i; std::memcpy(&i, &v, 4); return i; }
inline double __longlong_as_double(long long v) { double d; std::memcpy(&d, &v, 8); return d; }
inline long long __double_as_longlong(double v) { long long i; std::memcpy(&i, &v, 8); return i; }
template <typename T> inline T __ldg(const T* p) { return *p; }

namespace ssm_sim {

/* ---- half conversions (the PTX cvt instructions ssm uses; round to nearest even) ---- */

inline float cvt_f32_f16(unsigned short bits) { _Float16 h; std::memcpy(&h, &bits, 2); return (float)h; }
inline unsigned short cvt_rn_f16_f32(float v)
{
    _Float16 h = (_Float16)v;
    unsigned short b;
    std::memcpy(&b, &h, 2);
    return b;
}
inline unsigned short cvt_rn_f16_f64(double v)  /* one rounding, as cvt.rn.f16.f64 */
{
    _Float16 h = (_Float16)v;
    unsigned short b;
    std::memcpy(&b, &h, 2);
    return b;
}

/* cvt.rn.bf16.f32: round to nearest even (overflow to inf); every NaN gives the
   canonical NaN 0x7fff, as PTX specifies for conversions to bf16. */
inline unsigned short cvt_rn_bf16_f32(float v)
{
    unsigned int u;
    std::memcpy(&u, &v, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return 0x7fff;
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* ---- fibers ------------------------------------------------------------------------- */

struct Context {
#if SSM_SIM_ASM_SWITCH
    void* sp = nullptr;
#else
    ucontext_t uc;
#endif
};

#if SSM_SIM_ASM_SWITCH
/* Saves the callee-saved registers of the running fiber on its stack, stores its stack
   pointer in *from, and resumes the fiber whose stack pointer is `to` (SysV x86-64). */
extern "C" void ssm_sim_switch(void** from, void* to);
asm(R"(
    .text
    .p2align 4
    .hidden ssm_sim_switch
    .globl ssm_sim_switch
    .type ssm_sim_switch,@function
ssm_sim_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size ssm_sim_switch, .-ssm_sim_switch
)");
#endif

enum State { RUNNABLE, AT_BARRIER, AT_WARP_SYNC, EXITED };
enum WarpOp { SHFL_XOR, SHFL_DOWN, SHFL_UP, SHFL_IDX, SYNCWARP };
static const char* const WARP_OP_NAMES[] = {"__shfl_xor_sync", "__shfl_down_sync",
                                            "__shfl_up_sync", "__shfl_sync", "__syncwarp"};

struct Thread {
    Context ctx;
    char* stack;
    uint3 idx;
    int linear;
    State state;
    int site;                       /* source line of the barrier or warp op it waits at */
    unsigned sync_epoch;            /* warp ops and barriers passed (traffic grouping) */
    WarpOp op;
    unsigned mask;
    int arg, width;
    unsigned long long value, result;
#if SSM_SIM_ASAN
    void* fake_stack;
#endif
};

struct KernelDesc {
    const char* name;
    void (*fn)();
    int nparams;
    const char* signature;              /* "kind size type;..." per parameter */
    void* (*unpack)(void** params);     /* the arguments, copied as the parameter types */
    void (*run)(void (*fn)(), void* args);
    void (*free_args)(void* args);
};

/* Everything about the launch in progress (one at a time: the Python driver holds a lock). */
struct Globals {
    const KernelDesc* kernel = nullptr;
    void* args = nullptr;
    dim3 grid, block;
    uint3 block_idx;
    Thread* threads = nullptr;
    int nthreads = 0;
    Thread* cur = nullptr;
    Context sched;
    char* stacks = nullptr;
    size_t stack_size = 0, stacks_len = 0;
    int stacks_count = 0;
    unsigned long long epoch = 0;        /* barrier intervals, unique over all blocks */
    unsigned long long block_epoch = 0;  /* the epoch its block started in */
    bool failed = false;
    char* msg = nullptr;
    size_t msg_len = 0;
    sigjmp_buf fault_jmp;
    volatile sig_atomic_t in_launch = 0;
    pthread_t launcher;
    void* fault_addr = nullptr;
    int fault_write = 0;
    struct sigaction old_segv, old_bus;
#if SSM_SIM_ASAN
    const void* main_bottom = nullptr;
    size_t main_size = 0;
    void* sched_fake = nullptr;
#endif
};
inline Globals g;

inline void where(char* buf, size_t len, const Thread* t)
{
    std::snprintf(buf, len, "kernel %s, block (%u, %u, %u), thread (%u, %u, %u)", g.kernel->name,
                  g.block_idx.x, g.block_idx.y, g.block_idx.z, t->idx.x, t->idx.y, t->idx.z);
}

/* Record a violation (the first one wins): "<kernel, block, thread>: <what>". */
inline void report(const Thread* t, const char* fmt, ...)
{
    if (g.failed)
        return;
    g.failed = true;
    char head[256];
    where(head, sizeof head, t);
    char what[768];
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    std::snprintf(g.msg, g.msg_len, "%s: %s", head, what);
}

/* Thread t has blocked (or exited): run the next runnable thread of the scheduler's pass
   directly, or return to the scheduler at the end of the pass (one switch per thread and
   sync point instead of two). */
inline void switch_from(Thread* t)
{
    Thread* next = nullptr;
    for (int i = t->linear + 1; i < g.nthreads && !g.failed; ++i) {
        if (g.threads[i].state == RUNNABLE) {
            next = &g.threads[i];
            break;
        }
    }
#if SSM_SIM_ASAN
    __sanitizer_start_switch_fiber(t->state == EXITED ? nullptr : &t->fake_stack,
                                   next ? next->stack : g.main_bottom,
                                   next ? g.stack_size : g.main_size);
#endif
    g.cur = next;
#if SSM_SIM_ASM_SWITCH
    ssm_sim_switch(&t->ctx.sp, next ? next->ctx.sp : g.sched.sp);
#else
    swapcontext(&t->ctx.uc, next ? &next->ctx.uc : &g.sched.uc);
#endif
#if SSM_SIM_ASAN
    __sanitizer_finish_switch_fiber(t->fake_stack, nullptr, nullptr);
#endif
}

/* From the scheduler: run the pass's threads from t on. */
inline void to_fiber(Thread* t)
{
    g.cur = t;
#if SSM_SIM_ASAN
    __sanitizer_start_switch_fiber(&g.sched_fake, t->stack, g.stack_size);
#endif
#if SSM_SIM_ASM_SWITCH
    ssm_sim_switch(&g.sched.sp, t->ctx.sp);
#else
    swapcontext(&g.sched.uc, &t->ctx.uc);
#endif
#if SSM_SIM_ASAN
    __sanitizer_finish_switch_fiber(g.sched_fake, nullptr, nullptr);
#endif
}

/* A violation inside a kernel: report it and leave the fiber for good. */
[[noreturn]] inline void fail(const char* fmt, ...)
{
    Thread* t = g.cur;
    if (!g.failed) {
        char what[768];
        va_list ap;
        va_start(ap, fmt);
        std::vsnprintf(what, sizeof what, fmt, ap);
        va_end(ap);
        report(t, "%s", what);
    }
    t->state = EXITED;
    switch_from(t);
    __builtin_unreachable();
}

inline void fiber_main()
{
#if SSM_SIM_ASAN
    __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
    g.kernel->run(g.kernel->fn, g.args);
    g.cur->state = EXITED;
    switch_from(g.cur);
    __builtin_unreachable();
}

#if !SSM_SIM_ASM_SWITCH
inline void fiber_entry_uc() { fiber_main(); }
#endif

inline void fiber_start(Thread* t)
{
#if SSM_SIM_ASM_SWITCH
    /* A new fiber's stack as ssm_sim_switch leaves it: six saved registers, then the
       "return address" fiber_main, entered with rsp = 8 (mod 16) as after a call. */
    uintptr_t top = ((uintptr_t)t->stack + g.stack_size) & ~(uintptr_t)15;
    void** sp = (void**)(top - 64);
    for (int i = 0; i < 6; ++i)
        sp[i] = nullptr;
    sp[6] = (void*)&fiber_main;
    sp[7] = nullptr;
    t->ctx.sp = sp;
#else
    getcontext(&t->ctx.uc);
    t->ctx.uc.uc_stack.ss_sp = t->stack;
    t->ctx.uc.uc_stack.ss_size = g.stack_size;
    t->ctx.uc.uc_link = nullptr;
    makecontext(&t->ctx.uc, fiber_entry_uc, 0);
#endif
}

/* ---- synchronisation points ------------------------------------------------------- */

inline void syncthreads(int line)
{
    Thread* t = g.cur;
    t->state = AT_BARRIER;
    t->site = line;
    switch_from(t);
    ++t->sync_epoch;
}

template <typename V>
inline V warp_op(WarpOp op, int line, unsigned mask, V v, int arg, int width = 32)
{
    static_assert(sizeof(V) <= 8, "warp shuffles of more than 8 bytes are not simulated");
    Thread* t = g.cur;
    if (width <= 0 || width > 32 || (width & (width - 1)) != 0)
        fail("%s at line %d: width %d is not a power of 2 in [1, 32]", WARP_OP_NAMES[op], line,
             width);
    t->state = AT_WARP_SYNC;
    t->op = op;
    t->site = line;
    t->mask = mask;
    t->arg = arg;
    t->width = width;
    t->value = 0;
    std::memcpy(&t->value, &v, sizeof(V));
    switch_from(t);
    ++t->sync_epoch;
    V out;
    std::memcpy(&out, &t->result, sizeof(V));
    return out;
}

inline void syncwarp(int line, unsigned mask = 0xffffffffu)
{
    warp_op(SYNCWARP, line, mask, 0, 0);
}

/* ---- race-checked shared memory ------------------------------------------------------ */

/* A __shared__ array: every element access is checked against the other threads' accesses
   since the last barrier (racecheck) and against the block's writes (a read of an element
   no thread of this block has written is an uninitialised read). */
template <typename T, long long N>
struct shared_array {
    static constexpr int MANY = -2;
    struct Meta {
        unsigned long long w_epoch, r_epoch, init_epoch;
        int writer, reader;
    };
    const char* name;
    T data[N];
    Meta meta[N];

    explicit shared_array(const char* n) : name(n), data(), meta() {}

    T read(long long i)
    {
        Meta& m = meta[i];
        const int tid = g.cur->linear;
        if (m.init_epoch < g.block_epoch)
            fail("read of __shared__ %s[%lld], which no thread of this block has written "
                 "(uninitialised shared memory)", name, i);
        if (m.w_epoch == g.epoch && m.writer != tid)
            fail("shared-memory race on %s[%lld]: read after thread %d wrote it, with no "
                 "__syncthreads between", name, i, m.writer);
        if (m.r_epoch != g.epoch) {
            m.r_epoch = g.epoch;
            m.reader = tid;
        } else if (m.reader != tid) {
            m.reader = MANY;
        }
        return data[i];
    }
    void write(long long i, const T& v)
    {
        Meta& m = meta[i];
        const int tid = g.cur->linear;
        if (m.w_epoch == g.epoch && m.writer != tid)
            fail("shared-memory race on %s[%lld]: written after thread %d wrote it, with no "
                 "__syncthreads between", name, i, m.writer);
        if (m.r_epoch == g.epoch && m.reader != tid)
            fail("shared-memory race on %s[%lld]: written after %s read it, with no "
                 "__syncthreads between", name, i,
                 m.reader == MANY ? "other threads" : "another thread");
        m.w_epoch = g.epoch;
        m.writer = tid;
        m.init_epoch = g.epoch;
        data[i] = v;
    }
    struct ref {
        shared_array* a;
        long long i;
        operator T() const { return a->read(i); }
        ref& operator=(const T& v) { a->write(i, v); return *this; }
        ref& operator=(const ref& o) { a->write(i, (T)o); return *this; }
        ref& operator+=(const T& v) { a->write(i, a->read(i) + v); return *this; }
        ref& operator-=(const T& v) { a->write(i, a->read(i) - v); return *this; }
        ref& operator*=(const T& v) { a->write(i, a->read(i) * v); return *this; }
    };
    ref operator[](long long i)
    {
        if (i < 0 || i >= N)
            fail("__shared__ %s[%lld] is out of bounds (%lld elements)", name, i, N);
        return ref{this, i};
    }
};

/* ---- atomics: fibers never run concurrently, so a read-modify-write is atomic -------- */

template <typename T> inline T atomicAdd(T* p, T v) { T o = *p; *p = o + v; return o; }
template <typename T> inline T atomicMin(T* p, T v) { T o = *p; *p = v < o ? v : o; return o; }
template <typename T> inline T atomicMax(T* p, T v) { T o = *p; *p = v > o ? v : o; return o; }
template <typename T> inline T atomicExch(T* p, T v) { T o = *p; *p = v; return o; }
template <typename T> inline T atomicCAS(T* p, T cmp, T v) { T o = *p; if (o == cmp) *p = v; return o; }

/* ---- kernel descriptions ------------------------------------------------------------ */

template <typename T> const char* type_name()
{
    static const std::string f = __PRETTY_FUNCTION__;  /* "... type_name() [with T = <type>]" */
    static const std::string name = f.substr(f.find("T = ") + 4,
                                             f.find_first_of(";]", f.find("T = ")) - f.find("T = ") - 4);
    return name.c_str();
}

template <typename T> constexpr char kind_of()
{
    return std::is_pointer<T>::value ? 'p' : std::is_same<T, bool>::value ? 'b'
         : std::is_floating_point<T>::value ? 'f' : std::is_signed<T>::value && std::is_integral<T>::value ? 'i'
         : std::is_integral<T>::value ? 'u' : 's';
}

template <typename... P> struct Sig {
    using Args = std::tuple<P...>;
    template <size_t... I> static void* unpack_impl(void** params, std::index_sequence<I...>)
    {
        Args* a = new Args();
        (std::memcpy((void*)&std::get<I>(*a), params[I], sizeof(P)), ...);
        return a;
    }
    static void* unpack(void** params) { return unpack_impl(params, std::index_sequence_for<P...>{}); }
    static void run(void (*fn)(), void* args)
    {
        std::apply(reinterpret_cast<void (*)(P...)>(fn), *static_cast<Args*>(args));
    }
    static void free_args(void* args) { delete static_cast<Args*>(args); }
    static const char* signature()
    {
        static std::string s = [] {
            std::string r;
            ((r += std::string(1, kind_of<P>()) + " " + std::to_string(sizeof(P)) + " " +
                   type_name<P>() + ";"), ...);
            return r;
        }();
        return s.c_str();
    }
};

template <typename... P> KernelDesc describe(const char* name, void (*fn)(P...))
{
    return KernelDesc{name, reinterpret_cast<void (*)()>(fn), (int)sizeof...(P),
                      Sig<P...>::signature(), &Sig<P...>::unpack, &Sig<P...>::run,
                      &Sig<P...>::free_args};
}

}  // namespace ssm_sim

#define threadIdx (ssm_sim::g.cur->idx)
#define blockIdx (ssm_sim::g.block_idx)
#define blockDim (ssm_sim::g.block)
#define gridDim (ssm_sim::g.grid)
#define __syncthreads() ssm_sim::syncthreads(__LINE__)
#define __syncwarp(...) ssm_sim::syncwarp(__LINE__, ##__VA_ARGS__)
#define __shfl_xor_sync(mask, v, ...) ssm_sim::warp_op(ssm_sim::SHFL_XOR, __LINE__, mask, v, __VA_ARGS__)
#define __shfl_down_sync(mask, v, ...) ssm_sim::warp_op(ssm_sim::SHFL_DOWN, __LINE__, mask, v, __VA_ARGS__)
#define __shfl_up_sync(mask, v, ...) ssm_sim::warp_op(ssm_sim::SHFL_UP, __LINE__, mask, v, __VA_ARGS__)
#define __shfl_sync(mask, v, ...) ssm_sim::warp_op(ssm_sim::SHFL_IDX, __LINE__, mask, v, __VA_ARGS__)
using ssm_sim::atomicAdd;
using ssm_sim::atomicCAS;
using ssm_sim::atomicExch;
using ssm_sim::atomicMax;
using ssm_sim::atomicMin;



/* ---- memory traffic (the SSM_SIM_TRAFFIC build) --------------------------------------- */

#if SSM_SIM_TRAFFIC
#include <algorithm>
#include <unordered_map>
#include <vector>

namespace ssm_sim {

struct Traffic {
    struct Request {
        bool store;
        unsigned long long bytes;                  /* distinct bytes: a broadcast counts once */
        std::vector<uintptr_t> addresses;
        std::vector<unsigned long long> sectors;
    };
    std::vector<std::pair<uintptr_t, uintptr_t>> ranges;   /* the launch's allocations */
    std::unordered_map<unsigned long long, unsigned> executions;  /* (thread, pc, epoch) */
    std::unordered_map<unsigned long long, Request> requests;      /* (warp, pc, epoch, n) */
    unsigned long long totals[6];  /* load requests, bytes, sectors; store the same */
    bool busy;
};
inline Traffic traffic;

inline unsigned long long mix(unsigned long long h, unsigned long long v)
{
    return (h ^ v) * 0x100000001b3ULL + (v >> 29);
}

__attribute__((no_sanitize_address)) inline void on_access(uintptr_t a, size_t n, void* pc,
                                                           bool store)
{
    Traffic& tr = traffic;
    Thread* t = g.cur;
    if (!t || tr.busy || !g.kernel)
        return;
    tr.busy = true;  /* the containers below are instrumented too */
    bool ours = false;
    for (const auto& r : tr.ranges)
        ours = ours || (a >= r.first && a < r.second);
    if (!ours) {
        tr.busy = false;
        return;
    }
    const unsigned long long site = mix(mix((uintptr_t)pc, t->sync_epoch), store);
    const unsigned nth = tr.executions[mix(site, (unsigned long long)t->linear << 1 | 1)]++;
    Traffic::Request& r = tr.requests[mix(mix(site, (unsigned long long)(t->linear / 32)), nth)];
    r.store = store;
    if (std::find(r.addresses.begin(), r.addresses.end(), a) == r.addresses.end()) {
        r.addresses.push_back(a);
        r.bytes += n;
    }
    for (unsigned long long s = a >> 5; s <= (a + n - 1) >> 5; ++s)
        if (std::find(r.sectors.begin(), r.sectors.end(), s) == r.sectors.end())
            r.sectors.push_back(s);
    tr.busy = false;
}

/* A block is done: add its requests to the totals. */
__attribute__((no_sanitize_address)) inline void traffic_block_done()
{
    Traffic& tr = traffic;
    tr.busy = true;
    for (const auto& kv : tr.requests) {
        unsigned long long* t = tr.totals + (kv.second.store ? 3 : 0);
        t[0] += 1;
        t[1] += kv.second.bytes;
        t[2] += kv.second.sectors.size();
    }
    tr.requests.clear();
    tr.executions.clear();
    tr.busy = false;
}

}  // namespace ssm_sim

#define SSM_SIM_HOOKS(n)                                                                      \
    extern "C" __attribute__((no_sanitize_address)) void __asan_load##n##_noabort(uintptr_t a) \
    {                                                                                         \
        ssm_sim::on_access(a, n, __builtin_return_address(0), false);                         \
    }                                                                                         \
    extern "C" __attribute__((no_sanitize_address)) void __asan_store##n##_noabort(uintptr_t a)\
    {                                                                                         \
        ssm_sim::on_access(a, n, __builtin_return_address(0), true);                          \
    }
SSM_SIM_HOOKS(1)
SSM_SIM_HOOKS(2)
SSM_SIM_HOOKS(4)
SSM_SIM_HOOKS(8)
SSM_SIM_HOOKS(16)
extern "C" __attribute__((no_sanitize_address)) void __asan_loadN_noabort(uintptr_t a, size_t n)
{
    ssm_sim::on_access(a, n, __builtin_return_address(0), false);
}
extern "C" __attribute__((no_sanitize_address)) void __asan_storeN_noabort(uintptr_t a, size_t n)
{
    ssm_sim::on_access(a, n, __builtin_return_address(0), true);
}
extern "C" void __asan_handle_no_return() {}
extern "C" void __asan_before_dynamic_init(const char*) {}
extern "C" void __asan_after_dynamic_init() {}
#define SSM_SIM_TRAFFIC_BLOCK_DONE() ssm_sim::traffic_block_done()
#else
#define SSM_SIM_TRAFFIC_BLOCK_DONE()
#endif

/* ---- the launcher ------------------------------------------------------------------- */

namespace ssm_sim {

inline const char* state_name(const Thread& t, char* buf, size_t len)
{
    if (t.state == EXITED)
        std::snprintf(buf, len, "has exited");
    else if (t.state == AT_BARRIER)
        std::snprintf(buf, len, "waits at the __syncthreads of line %d", t.site);
    else
        std::snprintf(buf, len, "waits at the %s of line %d with mask 0x%08x", WARP_OP_NAMES[t.op],
                      t.site, t.mask);
    return buf;
}

/* Resolve the warp operations every thread of the block may be waiting at. Returns the
   number of threads made runnable, or -1 after reporting a violation. */
inline int resolve_warps()
{
    int released = 0;
    char buf[128];
    for (int w0 = 0; w0 < g.nthreads; w0 += 32) {
        Thread* warp = g.threads + w0;
        const int lanes = g.nthreads - w0 < 32 ? g.nthreads - w0 : 32;
        const unsigned all = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1u;
        /* the common case first: the whole warp at one warp op with the full mask */
        bool whole = true;
        for (int l = 0; l < lanes && whole; ++l)
            whole = warp[l].state == AT_WARP_SYNC && warp[l].mask == all &&
                    warp[l].site == warp[0].site && warp[l].op == warp[0].op;
        for (int l = 0; l < lanes && !whole; ++l) {
            Thread& t = warp[l];
            if (t.state != AT_WARP_SYNC)
                continue;
            const char* op = WARP_OP_NAMES[t.op];
            if (!(t.mask >> l & 1u)) {
                report(&t, "%s at line %d with mask 0x%08x, which does not name the calling lane %d",
                       op, t.site, t.mask, l);
                return -1;
            }
            for (int j = 0; j < 32; ++j) {
                if (!(t.mask >> j & 1u))
                    continue;
                if (j >= lanes) {
                    report(&t, "%s at line %d with mask 0x%08x names lane %d, which the block "
                           "(%d threads) does not have", op, t.site, t.mask, j, g.nthreads);
                    return -1;
                }
                const Thread& u = warp[j];
                if (u.state != AT_WARP_SYNC || u.mask != t.mask || u.site != t.site || u.op != t.op) {
                    report(&t, "%s at line %d with mask 0x%08x: lane %d of the mask %s", op,
                           t.site, t.mask, j, state_name(u, buf, sizeof buf));
                    return -1;
                }
            }
        }
        /* every waiting lane's mask group is complete: exchange */
        for (int l = 0; l < lanes; ++l) {
            Thread& t = warp[l];
            if (t.state != AT_WARP_SYNC)
                continue;
            const int w = t.width, seg = l / w * w;
            int src = l;
            switch (t.op) {
            case SHFL_XOR: src = l ^ t.arg; if (src < seg || src >= seg + w) src = l; break;
            case SHFL_DOWN: src = l % w + t.arg < w ? l + t.arg : l; break;
            case SHFL_UP: src = l % w >= t.arg ? l - t.arg : l; break;
            case SHFL_IDX: src = seg + ((t.arg % w) + w) % w; break;
            case SYNCWARP: break;
            }
            if (src < 0 || src >= 32 || !(t.mask >> src & 1u)) {
                report(&t, "%s at line %d with mask 0x%08x reads lane %d, which is not in the mask "
                       "(its value is undefined)", WARP_OP_NAMES[t.op], t.site, t.mask, src);
                return -1;
            }
            t.result = warp[src].value;
        }
        for (int l = 0; l < lanes; ++l) {
            if (warp[l].state == AT_WARP_SYNC) {
                warp[l].state = RUNNABLE;
                ++released;
            }
        }
    }
    return released;
}

/* Run one block to completion; false after a violation (reported). */
inline bool run_block()
{
    g.block_epoch = ++g.epoch;
    for (int i = 0; i < g.nthreads; ++i) {
        Thread& t = g.threads[i];
        t.linear = i;
        t.idx = uint3{(unsigned)(i % g.block.x), (unsigned)(i / g.block.x % g.block.y),
                      (unsigned)(i / (g.block.x * g.block.y))};
        t.state = RUNNABLE;
        t.sync_epoch = 0;
        t.stack = g.stacks + (size_t)i * g.stack_size;
        fiber_start(&t);
    }
    char buf[128];
    for (;;) {
        for (int i = 0; i < g.nthreads; ++i) {
            if (g.threads[i].state == RUNNABLE) {
                to_fiber(&g.threads[i]);  /* runs every runnable thread from i on */
                break;
            }
        }
        if (g.failed)
            return false;
        const int released = resolve_warps();
        if (released < 0)
            return false;
        if (released > 0)
            continue;
        const Thread* waiting = nullptr;
        for (int i = 0; i < g.nthreads && !waiting; ++i)
            if (g.threads[i].state == AT_BARRIER)
                waiting = &g.threads[i];
        if (!waiting) {
            SSM_SIM_TRAFFIC_BLOCK_DONE();
            return true;  /* every thread has exited */
        }
        for (int i = 0; i < g.nthreads; ++i) {
            const Thread& t = g.threads[i];
            if (t.state != AT_BARRIER || t.site != waiting->site) {
                report(waiting, "__syncthreads at line %d is not reached by every thread of the "
                       "block: thread (%u, %u, %u) %s", waiting->site, t.idx.x, t.idx.y, t.idx.z,
                       state_name(t, buf, sizeof buf));
                return false;
            }
        }
        ++g.epoch;
        for (int i = 0; i < g.nthreads; ++i)
            g.threads[i].state = RUNNABLE;
    }
}

inline void on_fault(int sig, siginfo_t* info, void* uctx)
{
    if (g.in_launch && pthread_equal(pthread_self(), g.launcher)) {
        g.fault_addr = info->si_addr;
#if defined(__x86_64__) && defined(REG_ERR)
        g.fault_write = (((ucontext_t*)uctx)->uc_mcontext.gregs[REG_ERR] & 2) != 0;
#else
        g.fault_write = -1;
#endif
        siglongjmp(g.fault_jmp, 1);
    }
    /* not ours: put the previous handler back and let the access fault again */
    sigaction(sig, sig == SIGSEGV ? &g.old_segv : &g.old_bus, nullptr);
}

/* ASan marks the frames of fibers that never returned (abandoned after a violation, and
   fiber_main's own) in its shadow memory: clear it before the stacks are reused by other
   code, or ASan would report accesses there as stack-buffer overflows. */
inline void unpoison_stacks()
{
#if SSM_SIM_ASAN
    if (g.stacks)
        __asan_unpoison_memory_region(g.stacks, (size_t)g.stacks_count * g.stack_size);
#endif
}

/* Fiber stacks: one mapping, a PROT_NONE guard page below each stack. */
inline bool ensure_stacks(int n)
{
    if (g.stacks_count >= n)
        return true;
    if (g.stacks) {
        unpoison_stacks();
        munmap(g.stacks - g.stack_size, g.stacks_len);
    }
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    g.stack_size = (SSM_SIM_ASAN ? 256 : 32) * 1024;
    g.stacks_len = (size_t)(n + 1) * g.stack_size;
    char* base = (char*)mmap(nullptr, g.stacks_len, PROT_READ | PROT_WRITE,
                             MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) {
        g.stacks = nullptr;
        g.stacks_count = 0;
        return false;
    }
    for (int i = 0; i <= n; ++i)
        mprotect(base + (size_t)i * g.stack_size, page, PROT_NONE);
    g.stacks = base + g.stack_size;  /* stack i: [stacks + i*size, +size), guard at its bottom */
    g.stacks_count = n;
    return true;
}

}  // namespace ssm_sim

extern const ssm_sim::KernelDesc ssm_sim_table[];
extern const int ssm_sim_table_size;

#define SSM_SIM_EXPORT extern "C" __attribute__((visibility("default")))

SSM_SIM_EXPORT int ssm_sim_kernel_count() { return ssm_sim_table_size; }
SSM_SIM_EXPORT const char* ssm_sim_kernel_name(int i) { return ssm_sim_table[i].name; }
SSM_SIM_EXPORT const char* ssm_sim_kernel_signature(int i) { return ssm_sim_table[i].signature; }
SSM_SIM_EXPORT int ssm_sim_asan() { return SSM_SIM_ASAN; }

#if SSM_SIM_TRAFFIC
/* Count the accesses of the next launches to these n [lo, hi) address ranges, from 0. */
SSM_SIM_EXPORT void ssm_sim_traffic_start(const unsigned long long* lohi, int n)
{
    ssm_sim::traffic.ranges.clear();
    for (int i = 0; i < n; ++i)
        ssm_sim::traffic.ranges.emplace_back(lohi[2 * i], lohi[2 * i + 1]);
    std::fill(ssm_sim::traffic.totals, ssm_sim::traffic.totals + 6, 0ULL);
}
/* load requests, bytes, sectors; store requests, bytes, sectors */
SSM_SIM_EXPORT void ssm_sim_traffic_totals(unsigned long long* out)
{
    std::copy(ssm_sim::traffic.totals, ssm_sim::traffic.totals + 6, out);
}
#endif

/* Launch kernel i on grid x block with the arguments params[j] (pointers to each argument,
   as cuLaunchKernel takes them; the driver has checked their sizes). Returns 0, 1 after a
   violation (message in msg), 2 after a memory fault (message, *fault_addr, *fault_write:
   1 write, 0 read, -1 unknown). ftz: flush float denormals. */
SSM_SIM_EXPORT int ssm_sim_launch(int i, const unsigned* grid, const unsigned* block, void** params,
                                  int ftz, char* msg, size_t msg_len, void** fault_addr,
                                  int* fault_write)
{
    using namespace ssm_sim;
    g.kernel = &ssm_sim_table[i];
    g.grid = dim3(grid[0], grid[1], grid[2]);
    g.block = dim3(block[0], block[1], block[2]);
    g.msg = msg;
    g.msg_len = msg_len;
    g.failed = false;
    msg[0] = '\0';
    const int n = (int)(block[0] * block[1] * block[2]);
    if (!ensure_stacks(n)) {
        std::snprintf(msg, msg_len, "kernel %s: cannot map the fiber stacks of %d threads",
                      g.kernel->name, n);
        return 1;
    }
    static Thread* threads = nullptr;
    static int threads_n = 0;
    if (threads_n < n) {
        delete[] threads;
        threads = new Thread[n]();
        threads_n = n;
    }
    g.threads = threads;
    g.nthreads = n;
    g.args = g.kernel->unpack(params);

    /* the fault handler runs on its own stack: a fiber's stack may be what overflowed */
    static char* altstack = nullptr;
    const size_t alt_size = 256 * 1024;
    if (!altstack)
        altstack = (char*)std::malloc(alt_size);
    stack_t alt{}, old_alt{};
    alt.ss_sp = altstack;
    alt.ss_size = alt_size;
    sigaltstack(&alt, &old_alt);
    struct sigaction sa{};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g.old_segv);
    sigaction(SIGBUS, &sa, &g.old_bus);
#if SSM_SIM_ASM_SWITCH
    const unsigned csr = _mm_getcsr();
    _mm_setcsr(ftz ? (csr | 0x8040u) : (csr & ~0x8040u));
#endif
#if SSM_SIM_ASAN
    {
        pthread_attr_t attr;
        void* lo;
        pthread_getattr_np(pthread_self(), &attr);
        pthread_attr_getstack(&attr, &lo, &g.main_size);
        g.main_bottom = lo;
        pthread_attr_destroy(&attr);
    }
#endif
    volatile int rc = 0;
    g.launcher = pthread_self();
    g.in_launch = 1;
    if (sigsetjmp(g.fault_jmp, 1) == 0) {
        for (unsigned z = 0; z < g.grid.z && rc == 0; ++z)
            for (unsigned y = 0; y < g.grid.y && rc == 0; ++y)
                for (unsigned x = 0; x < g.grid.x && rc == 0; ++x) {
                    g.block_idx = uint3{x, y, z};
                    if (!run_block())
                        rc = 1;
                }
    } else {
        g.in_launch = 0;
        const Thread* t = g.cur;
        const char* stack_lo = g.stacks - g.stack_size;
        const char* a = (const char*)g.fault_addr;
        char head[256];
        where(head, sizeof head, t);
        if (a >= stack_lo && a < g.stacks + (size_t)g.stacks_count * g.stack_size)
            std::snprintf(msg, msg_len, "%s: stack overflow (more than %zu KiB of stack)", head,
                          g.stack_size / 1024);
        else
            std::snprintf(msg, msg_len, "%s: invalid global %s at address %p", head,
                          g.fault_write == 1 ? "write" : g.fault_write == 0 ? "read" : "access",
                          g.fault_addr);
        *fault_addr = g.fault_addr;
        *fault_write = g.fault_write;
        rc = 2;
    }
    g.in_launch = 0;
    unpoison_stacks();
#if SSM_SIM_ASM_SWITCH
    _mm_setcsr(csr);
#endif
    sigaction(SIGSEGV, &g.old_segv, nullptr);
    sigaction(SIGBUS, &g.old_bus, nullptr);
    sigaltstack(&old_alt, nullptr);
    g.kernel->free_args(g.args);
    g.args = nullptr;
    return rc;
}

#endif /* SSM_CUDASIM_H */
