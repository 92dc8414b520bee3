// Explains a PNG image with an igcam bundle's explain.onnx from Node.js: ONNX Runtime's C++ core, no Python.
//
//   node explain.js BUNDLE IMAGE.png TARGET OUT_PREFIX [STEPS=50] [VARIANT=official|paper]
//
// Writes OUT_PREFIX.map.f32 (the map, float32 H x W, row-major), OUT_PREFIX.input.f32 (the model input it built,
// float32 C x H x W) and OUT_PREFIX.json (shape, target, steps, variant). The image is resized to the bundle's
// input size with plain half-pixel bilinear sampling (Pillow, used by the Python helpers, antialiases when it
// shrinks, so the two inputs differ slightly; explain.onnx itself is the same everywhere).
'use strict';
const fs = require('fs');
const path = require('path');
const ort = require('onnxruntime-node');
const { PNG } = require('pngjs');

function fail(message) {
  console.error(`explain.js: error: ${message}`);
  process.exit(2);
}

// Half-pixel bilinear resampling with clamped edges of an RGBA image to C x H x W pixel values (0..255).
function resize(png, height, width) {
  const out = new Float32Array(3 * height * width);
  const source = (y, x, c) => png.data[(y * png.width + x) * 4 + c];
  for (let y = 0; y < height; y++) {
    const sy = Math.max((y + 0.5) * png.height / height - 0.5, 0);
    const y0 = Math.floor(sy), y1 = Math.min(y0 + 1, png.height - 1), fy = sy - y0;
    for (let x = 0; x < width; x++) {
      const sx = Math.max((x + 0.5) * png.width / width - 0.5, 0);
      const x0 = Math.floor(sx), x1 = Math.min(x0 + 1, png.width - 1), fx = sx - x0;
      for (let c = 0; c < 3; c++) {
        const top = source(y0, x0, c) * (1 - fx) + source(y0, x1, c) * fx;
        const bottom = source(y1, x0, c) * (1 - fx) + source(y1, x1, c) * fx;
        out[(c * height + y) * width + x] = top * (1 - fy) + bottom * fy;
      }
    }
  }
  return out;
}

// The README's quadrature rules for the two presets: official = left rule, paper = right rule.
function nodes(steps, variant) {
  const alphas = new Float32Array(steps), weights = new Float32Array(steps).fill(1 / steps);
  for (let i = 0; i < steps; i++) alphas[i] = (variant === 'paper' ? i + 1 : i) / steps;
  return { alphas, weights };
}

async function main() {
  const [bundle, image, targetText, out, stepsText = '50', variant = 'official'] = process.argv.slice(2);
  if (!out) fail('usage: node explain.js BUNDLE IMAGE.png TARGET OUT_PREFIX [STEPS] [official|paper]');
  const manifest = JSON.parse(fs.readFileSync(path.join(bundle, 'manifest.json'), 'utf8'));
  const [channels, height, width] = manifest.input.shape;
  const target = Number.parseInt(targetText, 10), steps = Number.parseInt(stepsText, 10);
  if (manifest.task.kind !== 'classification' || manifest.outputs.length !== 1) {
    fail(`this example explains a classifier's class; the bundle's task is '${manifest.task.kind}'`);
  }
  const classes = manifest.task.classes;
  if (!(target >= 0 && target < classes)) fail(`target must be in [0, ${classes - 1}]`);
  if (!(steps >= 1)) fail('steps must be a positive integer');
  if (!['official', 'paper'].includes(variant)) fail('variant must be official or paper');
  if (channels !== 3) fail('this example feeds 3-channel images');

  const pixels = resize(PNG.sync.read(fs.readFileSync(image)), height, width);
  const pre = manifest.preprocess;  // null: raw 0..255 pixels, and black is all zeros
  const input = new Float32Array(pixels.length), baseline = new Float32Array(pixels.length);
  for (let c = 0; c < 3; c++) {
    const mean = pre ? pre.mean[c] : 0, std = pre ? pre.std[c] : 1, scale = pre ? pre.scale : 1;
    for (let i = c * height * width; i < (c + 1) * height * width; i++) {
      input[i] = (pixels[i] * scale - mean) / std;
      baseline[i] = -mean / std;
    }
  }
  const { alphas, weights } = nodes(steps, variant);
  const session = await ort.InferenceSession.create(path.join(bundle, manifest.graphs.explain.file));
  const { maps } = await session.run({
    images: new ort.Tensor('float32', input, [1, channels, height, width]),
    baseline: new ort.Tensor('float32', baseline, [1, channels, height, width]),
    alphas: new ort.Tensor('float32', alphas, [steps]),
    weights: new ort.Tensor('float32', weights, [steps]),
    // the target's seed: the cotangent of the class scores, the one-hot of the class
    seed_0: new ort.Tensor('float32', Float32Array.from({ length: classes }, (_, c) => (c === target ? 1 : 0)),
      [1, classes]),
    subtract_baseline: new ort.Tensor('float32', Float32Array.from([variant === 'paper' ? 1 : 0]), [1]),
  });
  fs.writeFileSync(`${out}.map.f32`, Buffer.from(maps.data.buffer, maps.data.byteOffset, maps.data.byteLength));
  fs.writeFileSync(`${out}.input.f32`, Buffer.from(input.buffer));
  fs.writeFileSync(`${out}.json`, JSON.stringify({ shape: [height, width], target, steps, variant }));
  console.log(`map of class ${target} (${steps} steps, ${variant}) -> ${out}.map.f32`);
}

main().catch((error) => fail(error.message));
