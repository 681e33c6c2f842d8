# Declarations of the C tile kernels (ssm/_kernels.h) used by ssm/_cpu.pyx.

cdef extern from "_kernels.h" nogil:
    enum:
        SSM_NO_TARGET
        SSM_U8
        SSM_I32
        SSM_I64
        SSM_SOFT
        SSM_CROSS_ENTROPY
        SSM_KL

    ctypedef struct ssm_problem:
        Py_ssize_t outer, C, inner, tile
        const void *x
        const void *x2
        int target_kind
        const void *target
        long long ignore_index
        const void *w
        const void *cw
        const void *lens
        double smoothing
        double loss_cap
        int loss
        const double *label_terms
        const void *d_loss_map
        double grad_scale
        void *out
        void *out2
        void *loss_map
        int stream
        double *norms
        Py_ssize_t *bads

    Py_ssize_t ssm_num_tiles(const ssm_problem *P)
    size_t ssm_scratch_bytes(const ssm_problem *P, size_t rsize)
    const char *ssm_simd_path()
    int ssm_float_exp_table()
    int ssm_float_exp_sweep_v3()
    int ssm_exp_sweep_v3  # 1: the AVX2 clone's hand-written sums of exp; 0: gcc's loop (tests)
    const char *ssm_compiler()
    const char *ssm_build_flags()

    void ssm_sswl_stats_f(const ssm_problem *P, Py_ssize_t t, double *norm, Py_ssize_t *bad)
    void ssm_sswl_stats_d(const ssm_problem *P, Py_ssize_t t, double *norm, Py_ssize_t *bad)
    double ssm_softmax_fwd_tile_f(const ssm_problem *P, Py_ssize_t t, void *buf, int logspace)
    double ssm_softmax_fwd_tile_d(const ssm_problem *P, Py_ssize_t t, void *buf, int logspace)
    double ssm_softmax_bwd_tile_f(const ssm_problem *P, Py_ssize_t t, void *buf)
    double ssm_softmax_bwd_tile_d(const ssm_problem *P, Py_ssize_t t, void *buf)
    double ssm_sswl_pass_tile_f(const ssm_problem *P, Py_ssize_t t, void *buf, int want_grad)
    double ssm_sswl_pass_tile_d(const ssm_problem *P, Py_ssize_t t, void *buf, int want_grad)
    int ssm_two_classes  # 1: the one-loop tiles of two classes; 0: the general ones (tests)
    long long ssm_two_class_tiles  # tiles the one-loop path has run (tests)
    double ssm_sswl_bwd_tile_f(const ssm_problem *P, Py_ssize_t t, void *buf)
    double ssm_sswl_bwd_tile_d(const ssm_problem *P, Py_ssize_t t, void *buf)
    # half-width logits (ssm/_half.h): _h float16, _b bfloat16; float32 scratch
    size_t ssm_half_scratch_bytes(const ssm_problem *P)
    int ssm_half_isa  # 2: AVX-512 rows, 1: AVX2 rows, F16C; 0: neither (tests set it)
    void ssm_half_convert(int bf16, int narrow, int software, const void *src, void *dst,
                          Py_ssize_t n)
    double ssm_softmax_fwd_tile_h(const ssm_problem *P, Py_ssize_t t, void *buf, int logspace)
    double ssm_softmax_fwd_tile_b(const ssm_problem *P, Py_ssize_t t, void *buf, int logspace)
    double ssm_softmax_bwd_tile_h(const ssm_problem *P, Py_ssize_t t, void *buf)
    double ssm_softmax_bwd_tile_b(const ssm_problem *P, Py_ssize_t t, void *buf)
    double ssm_sswl_tile_h(const ssm_problem *P, Py_ssize_t t, void *buf, int want_grad)
    double ssm_sswl_tile_b(const ssm_problem *P, Py_ssize_t t, void *buf, int want_grad)
    double ssm_sswl_bwd_tile_h(const ssm_problem *P, Py_ssize_t t, void *buf)
    double ssm_sswl_bwd_tile_b(const ssm_problem *P, Py_ssize_t t, void *buf)


# Declarations of the softmax-over-positions kernels (ssm/_positions.h).

cdef extern from "_positions.h" nogil:
    enum:
        SSM_POS_SOFTMAX
        SSM_POS_SOFTMAX_BWD
        SSM_POS_EXPECT
        SSM_POS_EXPECT_BWD

    ctypedef struct ssm_pos_problem:
        Py_ssize_t outer, L, inner, C, D, tile
        int from_prob
        const void *x
        const void *x2
        const void *grid
        const double *temp
        const void *dkp
        void *out
        void *kp
        void *var
        double *dtemp
        int stream
        int in_place
        Py_ssize_t grid_w
        int chunked

    Py_ssize_t ssm_pos_num_tiles(const ssm_pos_problem *P)
    size_t ssm_pos_scratch_bytes(const ssm_pos_problem *P, size_t rsize)
    void ssm_pos_tile_float(const ssm_pos_problem *P, int op, Py_ssize_t t, void *buf)
    void ssm_pos_tile_d(const ssm_pos_problem *P, int op, Py_ssize_t t, void *buf)
    # strided rows chunk by chunk (half: 0, or 1 float16, 2 bfloat16 with the float one)
    size_t ssm_pos_chunks_scratch_bytes(const ssm_pos_problem *P, int op, size_t rsize)
    void ssm_pos_tile_chunks_float(const ssm_pos_problem *P, int op, Py_ssize_t t, void *buf,
                                   int half)
    void ssm_pos_tile_chunks_d(const ssm_pos_problem *P, int op, Py_ssize_t t, void *buf,
                               int half)
    # half-width maps (float16, bfloat16: bf16 = 1), computed in float32
    size_t ssm_pos_half_scratch_bytes(const ssm_pos_problem *P)
    void ssm_pos_tile_half(const ssm_pos_problem *P, int op, Py_ssize_t t, void *buf, int bf16)
