"""The device implementation of the stages (see igcam_engine.stages) on an NVIDIA GPU: no host copy of
activations or gradients.

Images are uploaded once per call; forward.onnx and gradient.onnx read and write device buffers through
IOBinding (chunks are views into the uploaded batch; the activation and gradient buffers are reused across chunks,
one set per thread); the fused kernel (kernels/igcam.cu, a form per gradient method) reduces them into device maps,
which are upsampled on the device. Only the final maps (and, for `predict` and targets that are not linear, the
model's outputs) come back to the host; a target's seeds go to the device once per call (igcam_engine.methods).

Ordering: ONNX Runtime synchronizes its compute stream at the end of each run, so its outputs are complete when
the kernel is launched; the kernel's stream is synchronized before the next run may overwrite a buffer.
"""
from __future__ import annotations

import contextlib
import threading

import numpy as np

from igcam_engine.errors import Unavailable, install_hint
from igcam_engine.stages import Chunk, Forward, PlacedPath, Stages

THREADS = 256
DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
HELD_DTYPES = {**DTYPES, "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


class DeviceArray:
    """A device buffer owned by an OrtValue (or a pycuda allocation) with the shape it holds now."""

    def __init__(self, owner, pointer: int, shape, dtype):
        self.owner, self.pointer, self.shape, self.dtype = owner, int(pointer), tuple(shape), np.dtype(dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def row(self, index: int) -> int:
        """Device address of row `index` (rows along the first axis)."""
        return self.pointer + index * int(np.prod(self.shape[1:])) * self.dtype.itemsize


class DeviceStages(Stages):
    def __init__(self, forward, gradient, device_id: int = 0, held=(), outputs=()):
        try:
            import onnxruntime as ort
            import pycuda.driver as cuda
        except ImportError:
            raise Unavailable(f"the GPU path needs pycuda: {install_hint('gpu')}") from None
        cuda.init()
        self._ort, self._cuda = ort, cuda
        self._device_id = device_id
        # The device's primary context: the one ONNX Runtime's CUDA provider works in.
        self._primary = cuda.Device(device_id).retain_primary_context()
        self._forward, self._gradient = forward, gradient
        self._held = [h.name for h in held]  # forward outputs, gradient inputs: ONNX Runtime allocates them on the device
        self._results = [o.name for o in outputs]  # gradient outputs: the model's outputs
        self._seeds = [o.seed for o in outputs]  # gradient inputs: their cotangents
        self._no_seeds = [np.zeros((1, *o.shape), np.float32) for o in outputs]  # outputs only: zero seeds
        self._activation_type = DTYPES[forward.get_outputs()[0].type]
        with self._context():
            module = _load_module(cuda)
            self._accumulate = {np.float32: module.get_function("igcam_accumulate_f32"),
                                np.float16: module.get_function("igcam_accumulate_f16")}
            self._upsample = module.get_function("igcam_upsample_bilinear")
        self._local = threading.local()

    @contextlib.contextmanager
    def _context(self):
        """pycuda's current context is per thread: make the primary context current for the calling thread."""
        self._primary.push()
        try:
            yield
        finally:
            self._cuda.Context.pop()

    def _buffer(self, name: str, shape, dtype) -> DeviceArray:
        """This thread's reusable buffer `name`, grown when a chunk needs more room than before."""
        buffers = self._local.__dict__.setdefault("buffers", {})
        key, size = (name, np.dtype(dtype).str), int(np.prod(shape))
        held = buffers.get(key)
        if held is None or held[1] < size:
            value = self._ort.OrtValue.ortvalue_from_shape_and_type([size], dtype, "cuda", self._device_id)
            held = buffers[key] = (value, size)
        return DeviceArray(held[0], held[0].data_ptr(), shape, dtype)

    def put(self, array: np.ndarray) -> DeviceArray:
        value = self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), "cuda", self._device_id)
        return DeviceArray(value, value.data_ptr(), array.shape, array.dtype)

    def _bind(self, binding, name: str, array: DeviceArray, first: int, last: int) -> None:
        binding.bind_input(name, "cuda", self._device_id, array.dtype.type, [last - first, *array.shape[1:]],
                           array.row(first))

    def interpolate(self, images: DeviceArray, chunk: Chunk, base: DeviceArray, alphas: np.ndarray,
                    keep: bool = False) -> Forward:
        return self._run_forward(images, chunk.first, chunk.last, base, *((0, 1) if len(base) == 1 else
                                                                           (chunk.first, chunk.last)), alphas, keep)

    def activations(self, images: DeviceArray, keep: bool = False) -> Forward:
        # forward.onnx interpolates; at alpha 1 from the image itself, base + 1 * (x - base) is x exactly
        return self._run_forward(images, 0, len(images), images, 0, len(images), np.ones(1, np.float32), keep)

    def _run_forward(self, images: DeviceArray, first: int, last: int, base: DeviceArray, base_first: int,
                     base_last: int, alphas: np.ndarray, keep: bool) -> Forward:
        binding = self._forward.io_binding()
        self._bind(binding, "images", images, first, last)
        self._bind(binding, "baseline", base, base_first, base_last)
        binding.bind_cpu_input("alphas", np.asarray(alphas, np.float32))
        shape = [(last - first) * len(alphas), *self._forward.get_outputs()[0].shape[1:]]
        if keep:  # cached across calls (baseline activations): its own buffer, not the per-thread one
            value = self._ort.OrtValue.ortvalue_from_shape_and_type(shape, self._activation_type, "cuda", self._device_id)
            out = DeviceArray(value, value.data_ptr(), shape, self._activation_type)
        else:
            out = self._buffer("activations", shape, self._activation_type)
        binding.bind_output("activations", "cuda", self._device_id, out.dtype.type, list(out.shape), out.pointer)
        for name in self._held:
            binding.bind_output(name, "cuda", self._device_id)
        self._forward.run_with_iobinding(binding)
        held = [DeviceArray(value, value.data_ptr(), value.shape(), HELD_DTYPES[value.data_type()])
                for value in binding.get_outputs()[1:]]
        return Forward(out, tuple(held))

    def _gradient_binding(self, forward: Forward, seeds: list, index: np.ndarray):
        """The gradient graph's inputs bound: activations and held tensors on the device, the seeds where they were
        put (device buffers, or host arrays ONNX Runtime copies), the row -> seed index from the host."""
        binding = self._gradient.io_binding()
        self._bind(binding, "activations", forward.activations, 0, len(forward.activations))
        for name, value in zip(self._held, forward.held):
            self._bind(binding, name, value, 0, len(value))
        for name, seed in zip(self._seeds, seeds):
            if isinstance(seed, DeviceArray):
                self._bind(binding, name, seed, 0, len(seed))
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(seed, dtype=np.float32))
        binding.bind_cpu_input("seed_index", np.ascontiguousarray(index, dtype=np.int64))
        return binding

    def gradient(self, forward: Forward, seeds: list, index: np.ndarray) -> DeviceArray:
        binding = self._gradient_binding(forward, seeds, index)
        activations = forward.activations
        out = self._buffer("activation_grad", activations.shape, activations.dtype)
        binding.bind_output("activation_grad", "cuda", self._device_id, out.dtype.type, list(out.shape), out.pointer)
        self._gradient.run_with_iobinding(binding)
        return out

    def outputs(self, forward: Forward) -> list:
        # gradient.onnx takes the seeds of its gradient output; the outputs do not depend on them
        binding = self._gradient_binding(forward, self._no_seeds, np.zeros(len(forward.activations), np.int64))
        for name in self._results:
            binding.bind_output(name, "cpu")
        self._gradient.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def maps(self, images: int, targets: int, size) -> DeviceArray:
        shape = (images, targets, *size)
        with self._context():
            allocation = self._cuda.mem_alloc(int(np.prod(shape)) * 4)
            self._cuda.memset_d32(allocation, 0, int(np.prod(shape)))
        return DeviceArray(allocation, int(allocation), shape, np.float32)

    def accumulate(self, maps: DeviceArray, chunk: Chunk, target: int, activations: DeviceArray, grads: DeviceArray,
                   path: PlacedPath, method) -> None:
        if method.kernel is None:
            raise Unavailable(f"method {method.name!r} has no form in the fused CUDA kernel yet; run it with "
                              "providers='cpu'")
        _, targets, h, w = maps.shape
        channels, pixels = activations.shape[1], h * w
        base_pointer, per_image = 0, 0
        if path.base_activations is not None:
            per_image = int(len(path.base_activations) > 1)
            base_pointer = path.base_activations.row(chunk.first if per_image else 0)
        with self._context():
            stream = self._stream()
            self._accumulate[activations.dtype.type](
                np.uintp(activations.pointer), np.uintp(grads.pointer), np.uintp(base_pointer), np.int32(per_image),
                np.uintp(path.weights.row(chunk.start)),
                np.uintp(maps.pointer + (chunk.first * targets + target) * pixels * 4),
                np.int64(targets * pixels), np.int32(chunk.nodes), np.int32(channels), np.int32(pixels),
                np.int32(method.kernel), block=(THREADS, 1, 1), grid=(chunk.rows, 1),
                shared=(channels + THREADS) * 4, stream=stream,
            )
            stream.synchronize()  # ONNX Runtime may overwrite these buffers in the next run

    def _stream(self):
        """This thread's CUDA stream for the kernels, created on its first use."""
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = self._cuda.Stream()
        return stream

    def to_host(self, array: DeviceArray) -> np.ndarray:
        host = np.empty(array.shape, array.dtype)
        with self._context():
            self._cuda.memcpy_dtoh(host, array.pointer)
        return host

    def finish(self, maps: DeviceArray, size) -> np.ndarray:
        count, height, width = maps.shape[0] * maps.shape[1], size[0], size[1]
        host = np.empty((maps.shape[0], maps.shape[1], height, width), np.float32)
        with self._context():
            target = self._cuda.mem_alloc(host.nbytes)
            total = count * height * width
            self._upsample(np.uintp(maps.pointer), target, np.int32(count), np.int32(maps.shape[2]),
                           np.int32(maps.shape[3]), np.int32(height), np.int32(width),
                           block=(THREADS, 1, 1), grid=((total + THREADS - 1) // THREADS, 1))
            self._cuda.memcpy_dtoh(host, target)
        return host


def _load_module(cuda):
    """The shipped PTX (JIT-compiled by the driver); a driver too old for its PTX version gets the source compiled
    here instead (that needs nvcc)."""
    from igcam_engine.kernels import ptx_path, source_path

    try:
        return cuda.module_from_file(ptx_path())
    except cuda.Error:
        from pycuda.compiler import SourceModule

        with open(source_path()) as f:
            return SourceModule(f.read(), no_extern_c=True)
