// Fused reductions of the gradient CAM methods and bilinear upsampling, launched by igcam_engine/device.py on ONNX
// Runtime's buffers.
//
// igcam_accumulate_{f32,f16}: one block per interpolated image (row = image * steps + step). With V = A[row] - A0
// (A0 = 0 without a baseline), the block forms s[p] = sum_k c[k, p] V[k, p], rectifies it and adds
// weights[step] * s[p] into the image's map with atomics. `form` chooses c (igcam_engine/methods.py's table, whose
// numpy reductions define them):
//   FORM_GRADCAM    c[k]    = mean_p dA[k, p]
//   FORM_GRADCAMPP  c[k]    = sum_p ReLU(dA) alpha, alpha = dA^2 / (2 dA^2 + sum_p V[k] dA^3 + 1e-6), 0 where dA = 0
//   FORM_XGRADCAM   c[k]    = sum_p dA[k, p] V[k, p] / (sum_p V[k, p] + 1e-7)
//   FORM_HIRESCAM   c[k, p] = dA[k, p]
//   FORM_LAYERCAM   c[k, p] = ReLU(dA[k, p])
// The channel forms keep c[k] in shared memory (one warp per channel); the elementwise forms read dA beside V.
// No per-row map ever reaches global memory. Accumulation is float32.
#include <cuda_fp16.h>

enum Form { FORM_GRADCAM = 0, FORM_GRADCAMPP = 1, FORM_XGRADCAM = 2, FORM_HIRESCAM = 3, FORM_LAYERCAM = 4 };
#define GRADCAM_PLUSPLUS_EPS 1e-6f
#define XGRADCAM_EPS 1e-7f

__device__ __forceinline__ float as_float(float v) { return v; }
__device__ __forceinline__ float as_float(__half v) { return __half2float(v); }

// The warp's sum of `value`, in every lane.
__device__ __forceinline__ float warp_sum(float value) {
    for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
    return value;
}

template <typename T>
__device__ __forceinline__ float centred(const T* a, const T* a0, size_t index) {
    return a0 == nullptr ? as_float(a[index]) : as_float(a[index]) - as_float(a0[index]);
}

template <typename T>
__device__ void accumulate(const T* __restrict__ activations, const T* __restrict__ grads,
                           const T* __restrict__ base, int base_per_image, const float* __restrict__ weights,
                           float* __restrict__ maps, long long map_stride, int steps, int channels, int pixels,
                           int form) {
    extern __shared__ float shared[];
    float* channel_weight = shared;            // [channels]
    float* partial = shared + channels;        // [tile]
    const int row = blockIdx.x;
    const int image = row / steps, step = row % steps;
    const size_t plane = (size_t)channels * pixels;
    const T* a = activations + (size_t)row * plane;
    const T* g = grads + (size_t)row * plane;
    const T* a0 = base == nullptr ? nullptr : base + (base_per_image ? (size_t)image * plane : 0);

    // Channel weights of the channel forms: one warp per channel, lanes stride over the pixels.
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const bool elementwise = form == FORM_HIRESCAM || form == FORM_LAYERCAM;
    for (int k = elementwise ? channels : warp; k < channels; k += warps) {
        const size_t channel = (size_t)k * pixels;
        float weight;
        if (form == FORM_GRADCAM) {
            float sum = 0.f;
            for (int p = lane; p < pixels; p += 32) sum += as_float(g[channel + p]);
            weight = warp_sum(sum) / pixels;
        } else if (form == FORM_XGRADCAM) {
            float product = 0.f, mass = 0.f;
            for (int p = lane; p < pixels; p += 32) {
                const float v = centred(a, a0, channel + p);
                product += as_float(g[channel + p]) * v;
                mass += v;
            }
            weight = warp_sum(product) / (warp_sum(mass) + XGRADCAM_EPS);
        } else {  // FORM_GRADCAMPP
            float mass = 0.f;
            for (int p = lane; p < pixels; p += 32) mass += centred(a, a0, channel + p);
            mass = warp_sum(mass);
            float sum = 0.f;
            for (int p = lane; p < pixels; p += 32) {
                const float d = as_float(g[channel + p]), d2 = d * d;
                if (d > 0.f) sum += d * (d2 / (2.f * d2 + mass * (d2 * d) + GRADCAM_PLUSPLUS_EPS));
            }
            weight = warp_sum(sum);
        }
        if (lane == 0) channel_weight[k] = weight;
    }
    __syncthreads();

    // Weighted channel sum over a tile of pixels; when the tile is smaller than the block (small h*w), several
    // thread slices split the channels and meet in shared memory.
    const int tile = min(pixels, (int)blockDim.x);
    const int slices = blockDim.x / tile;
    const int local = threadIdx.x % tile, slice = threadIdx.x / tile;
    const float weight = weights[step];
    float* map = maps + (long long)image * map_stride;
    for (int first = 0; first < pixels; first += tile) {
        if (threadIdx.x < tile) partial[threadIdx.x] = 0.f;
        __syncthreads();
        const int p = first + local;
        if (slice < slices && p < pixels) {
            float s = 0.f;
            for (int k = slice; k < channels; k += slices) {
                const size_t index = (size_t)k * pixels + p;
                float c;
                if (!elementwise) c = channel_weight[k];
                else if (form == FORM_HIRESCAM) c = as_float(g[index]);
                else c = fmaxf(as_float(g[index]), 0.f);
                s += c * centred(a, a0, index);
            }
            atomicAdd(&partial[local], s);
        }
        __syncthreads();
        if (threadIdx.x < tile && first + threadIdx.x < pixels) {
            const float s = partial[threadIdx.x];
            if (s > 0.f) atomicAdd(&map[first + threadIdx.x], weight * s);
        }
        __syncthreads();
    }
}

extern "C" __global__ void igcam_accumulate_f32(const float* activations, const float* grads, const float* base,
                                                int base_per_image, const float* weights, float* maps,
                                                long long map_stride, int steps, int channels, int pixels,
                                                int form) {
    accumulate<float>(activations, grads, base, base_per_image, weights, maps, map_stride, steps, channels, pixels,
                   form);
}

extern "C" __global__ void igcam_accumulate_f16(const __half* activations, const __half* grads, const __half* base,
                                                int base_per_image, const float* weights, float* maps,
                                                long long map_stride, int steps, int channels, int pixels,
                                                int form) {
    accumulate<__half>(activations, grads, base, base_per_image, weights, maps, map_stride, steps, channels, pixels,
                   form);
}

// Half-pixel bilinear resampling with clamped edges (torch align_corners=False), one thread per output pixel.
extern "C" __global__ void igcam_upsample_bilinear(const float* __restrict__ source, float* __restrict__ target,
                                                   int count, int in_h, int in_w, int out_h, int out_w) {
    const long long index = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (index >= (long long)count * out_h * out_w) return;
    const int x = index % out_w, y = (index / out_w) % out_h;
    const long long map = index / ((long long)out_w * out_h);
    const float sy = fmaxf((y + 0.5f) * in_h / out_h - 0.5f, 0.f);
    const float sx = fmaxf((x + 0.5f) * in_w / out_w - 0.5f, 0.f);
    const int y0 = (int)sy, x0 = (int)sx;
    const int y1 = min(y0 + 1, in_h - 1), x1 = min(x0 + 1, in_w - 1);
    const float fy = sy - y0, fx = sx - x0;
    const float* m = source + map * in_h * in_w;
    const float top = m[y0 * in_w + x0] * (1.f - fx) + m[y0 * in_w + x1] * fx;
    const float bottom = m[y1 * in_w + x0] * (1.f - fx) + m[y1 * in_w + x1] * fx;
    target[index] = top * (1.f - fy) + bottom * fy;
}
