// Fused IG-CAM reduction and bilinear upsampling, launched by igcam_engine/gpu.py on ONNX Runtime's buffers.
//
// igcam_accumulate_{f32,f16}: one block per interpolated image (row = image * steps + step). The block forms the
// channel weights g[k] = mean over pixels of dA[row, k] in shared memory, then the weighted channel sum
// s[p] = sum_k g[k] (A[row, k, p] - A0[k, p]), the ReLU, and adds weights[step] * s[p] into the image's map with
// atomics. A and dA are each read once; no per-row map ever reaches global memory. Accumulation is float32.
#include <cuda_fp16.h>

__device__ __forceinline__ float as_float(float v) { return v; }
__device__ __forceinline__ float as_float(__half v) { return __half2float(v); }

template <typename T>
__device__ void accumulate(const T* __restrict__ activations, const T* __restrict__ grads,
                           const T* __restrict__ base, int base_per_image, const float* __restrict__ weights,
                           float* __restrict__ maps, long long map_stride, int steps, int channels, int pixels) {
    extern __shared__ float shared[];
    float* channel_weight = shared;            // [channels]
    float* partial = shared + channels;        // [tile]
    const int row = blockIdx.x;
    const int image = row / steps, step = row % steps;
    const size_t plane = (size_t)channels * pixels;
    const T* a = activations + (size_t)row * plane;
    const T* g = grads + (size_t)row * plane;
    const T* a0 = base == nullptr ? nullptr : base + (base_per_image ? (size_t)image * plane : 0);

    // Channel weights: one warp per channel, lanes stride over the pixels.
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int k = warp; k < channels; k += warps) {
        float sum = 0.f;
        for (int p = lane; p < pixels; p += 32) sum += as_float(g[(size_t)k * pixels + p]);
        for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_down_sync(0xffffffffu, sum, offset);
        if (lane == 0) channel_weight[k] = sum / pixels;
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
                float v = as_float(a[(size_t)k * pixels + p]);
                if (a0 != nullptr) v -= as_float(a0[(size_t)k * pixels + p]);
                s += channel_weight[k] * v;
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
                                                long long map_stride, int steps, int channels, int pixels) {
    accumulate<float>(activations, grads, base, base_per_image, weights, maps, map_stride, steps, channels, pixels);
}

extern "C" __global__ void igcam_accumulate_f16(const __half* activations, const __half* grads, const __half* base,
                                                int base_per_image, const float* weights, float* maps,
                                                long long map_stride, int steps, int channels, int pixels) {
    accumulate<__half>(activations, grads, base, base_per_image, weights, maps, map_stride, steps, channels, pixels);
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
