"""Benchmark MARS against its physical limit.

Two views cost twice one view; everything MARS adds on top of that (hooks, warp-back, distances,
query matching) touches tensors far smaller than the network. So a MARS training step should cost
about what the rotation-augmentation control (`rotaug`, the same two-view batch, supervised loss
only) costs. This script measures that, side by side in one process run, and writes the ratios:

    hook_overhead                     forward with every hybrid tap hooked / plain forward     (goal <= 1.02)
    mars_over_rotaug_step             training step mars-hybrid / rotaug                       (goal <= 1.10)
    batched_over_two_single           one step on [x ; R x] / two single-view steps            (goal <= 0.95)
    mars_attention_over_rotaug_memory peak memory mars-attention / rotaug                      (goal <= 1.15)
    sweep_linearity                   24-angle sweep / (24 x one angle)                        (goal <= 1.05)
    train_images_per_s.<variant>      images through the network per second of training
    sweep_images_per_s.<variant>      evaluated tiles x angles per second of the rotation sweep

Method
- Times: `time.perf_counter` around each call (CUDA: synchronized), variants interleaved within each
  repeat (A B C A B C ...) so that drift hits all alike, the median over `--repeats` after
  `--warmup` discarded repeats. Every variant sees the same batches in the same order.
- Hook overhead: what the hooks add is far below the scatter of one forward, so plain and hooked
  forwards run in back-to-back pairs and the overhead is 1 + median(hooked - plain) / median(plain);
  `hook_overhead_of_medians` is the plain ratio of the two medians, for comparison.
- A training step is what Lightning runs per batch: `on_train_batch_start`, `training_step`,
  `backward`, `AdamW.step`, `zero_grad`. Batches come from `ViewPairs`/`collate_pairs` with view-2
  angles drawn uniformly in [0, 360) (the default ablation's policy), so warp-backs take the
  bilinear path, not the exact rot90 one.
- Memory: each variant runs in a fresh child process. CPU: the child reads its resident set size
  after loading the data and building the batches, resets the kernel's high-water mark
  (`/proc/self/clear_refs`), builds the model and optimizer, runs a few steps and reads the new
  high-water mark (`VmHWM`); peak memory = high-water mark - baseline (weights, gradients, optimizer
  state, activations; the interpreter and libraries are excluded because they are the same for
  every variant). Where the reset is not possible it falls back to `ru_maxrss` and says so. CUDA:
  `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`, minus the memory allocated
  before the model was built.
- The machine: `other_load_cores` is the CPU time other processes took during the run, in cores;
  above 0.05 the table warns that the timings are distorted (2 cores shared give nonsense).
- Sweep: `mars_nb.evaluate.sweep` over the 24 angles 0, 15, ..., 345 against the sum of its parts:
  the upright pass alone (a sweep of [0]) plus the extra cost of each other angle, measured as a sweep
  of [0, 90] (a quarter turn: exact, no resampling) or [0, 45] (bilinear) minus the upright one. The 24
  angles hold 3 quarter turns and 20 others, so sweep_linearity = t(24) / (t0 + 3 m90 + 20 m45): 1.0
  when a sweep costs what its angles cost, above it when something is paid per call or grows with the
  number of angles. (`sweep_over_24_upright` is t(24) / (24 t0): it also counts the resampling and the
  rotating back that only non-zero angles do.) Short sweeps are repeated 4 times per call and averaged.

Presets: `tiny` (128x128, 8 images per view), `small` (tiny widened and deepened, 192x192, 4 per view),
`r50` (the paper's ResNet-50 Mask2Former at 128x128, 2 per view, fewer repeats), `r50-512` (for a GPU:
512x512, bf16) and `smoke` (seconds; for the tests).

Layout: this script holds the settings, the measurements and the report; `timing.py` (beside it) how a call
is clocked and repeats are interleaved, `memory.py` how a peak is measured.

Usage: python bench/bench_mars.py --preset tiny --preset r50 [--repeats N] [--out-dir reports]   # make bench
       python bench/bench_mars.py --preset r50-512 --device cuda          # -> reports/bench-gpu.json
Each preset writes one flat {"name": value} JSON file (the figures of one preset on one machine, with
the machine and settings as fields): `bench.json` for tiny on CPU (the headline figures),
`bench-<preset>.json` for the other presets, `bench-gpu.json` on CUDA.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from memory import CHILD_ENV, PeakMemory  # noqa: E402  (bench/, beside this script)
from timing import OtherLoad, interleaved, machine_info, spread  # noqa: E402

GOALS = {"hook_overhead": 1.02, "mars_over_rotaug_step": 1.10, "batched_over_two_single": 0.95,
         "mars_attention_over_rotaug_memory": 1.15, "sweep_linearity": 1.05}

# Benchmark settings per preset: the model preset (+ config overrides), crop, images per view per step,
# the training variants timed, repeats, and the sweep's test tiles (None: all of the crater test split),
# batch size and repeats. `r50` is the paper's architecture, cut to what 2 CPU cores do in a few minutes.
_ALL = ("none", "rotaug", "mars-hybrid", "mars-attention", "mars-pixel", "mars-backbone", "mars-paper")
_NEEDED = ("none", "rotaug", "mars-hybrid", "mars-attention")
PRESETS = {
    "tiny": dict(model="tiny", overrides={}, crop=128, batch=8, variants=_ALL, repeats=7, warmup=2,
                 sweep_tiles=None, sweep_batch=16, sweep_repeats=5, hook_pairs=80, memory_steps=3),
    "small": dict(model="tiny", crop=192, batch=4, variants=_ALL, repeats=5, warmup=2,
                  overrides=dict(backbone_config=dict(hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2]),
                                 feature_size=128, mask_feature_size=128, hidden_dim=128, encoder_layers=2,
                                 encoder_feedforward_dim=256, decoder_layers=6, num_attention_heads=8,
                                 dim_feedforward=256, num_queries=50, train_num_points=4096),
                  sweep_tiles=None, sweep_batch=8, sweep_repeats=2, hook_pairs=40, memory_steps=2),
    "r50": dict(model="r50", overrides={}, crop=128, batch=2, variants=_NEEDED, repeats=12, warmup=1,
                sweep_tiles=4, sweep_batch=4, sweep_repeats=2, hook_pairs=30, memory_steps=1),
    "r50-512": dict(model="r50", overrides={}, crop=512, batch=4, variants=_ALL, repeats=7, warmup=3,
                    sweep_tiles=None, sweep_batch=8, sweep_repeats=3, hook_pairs=40, memory_steps=3),   # GPU
    "smoke": dict(model="tiny", overrides={}, crop=64, batch=2, variants=_NEEDED, repeats=1, warmup=0,
                  sweep_tiles=2, sweep_batch=2, sweep_repeats=1, hook_pairs=2, memory_steps=1),      # tests: does it run
}

VARIANTS = {  # name -> (training mode, MARS config)
    "none": ("none", None),
    "rotaug": ("rotaug", None),
    "mars-hybrid": ("mars", {"preset": "hybrid"}),
    "mars-attention": ("mars", {"preset": "attention"}),
    "mars-pixel": ("mars", {"preset": "pixel"}),
    "mars-backbone": ("mars", {"preset": "backbone"}),
    "mars-paper": ("mars", {"preset": "paper"}),
}
MEMORY_VARIANTS = ("rotaug", "mars-attention", "mars-hybrid")
SWEEP_VARIANTS = ("rotaug", "mars-hybrid")
SWEEP_ANGLES = tuple(float(a) for a in range(0, 360, 15))
ONE_ANGLE_CALLS = 4


class Bench:
    "Models, optimizers and batches of one benchmark preset."

    def __init__(self, spec: dict, device: str, precision: str, repeats: int | None = None, warmup: int | None = None):
        from mars_nb.data import load_dataset
        from mars_nb.config import AnglePolicy
        from mars_nb.pairs import ViewPairs, collate_pairs
        self.spec, self.device, self.precision = spec, device, precision
        self.repeats = spec["repeats"] if repeats is None else repeats
        self.warmup = spec["warmup"] if warmup is None else warmup
        self.ds = load_dataset("craters")
        self.policy = AnglePolicy("range", [0.0, 360.0])
        B = spec["batch"]
        pairs = ViewPairs(self.ds, spec["crop"], B, self.policy, seed=0)
        self.batches, self.data_s = [], []
        for i in range(max(self.warmup + self.repeats, 1)):  # the data stream, timed on the way (not in the steps)
            t = time.perf_counter()
            batch = collate_pairs([pairs[i * B + j] for j in range(B)])
            self.data_s.append(time.perf_counter() - t)
            self.batches.append(self._to(batch))

    def _to(self, batch: dict) -> dict:
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def module(self, variant: str):
        "A fresh `MarsModule` of `variant` (same initial weights for every variant) and its optimizer."
        from mars_nb.config import DataConfig, ModelConfig, RunConfig, TrainConfig
        from mars_nb.train import MarsModule
        mode, mars = VARIANTS[variant]
        s = self.spec
        cfg = RunConfig(data=DataConfig(crop=s["crop"], batch_size=s["batch"]),
                        model=ModelConfig(preset=s["model"], overrides=dict(s["overrides"])),
                        train=TrainConfig(mode=mode, angles=self.policy), mars=mars or {})
        torch.manual_seed(0)
        mod = MarsModule(cfg.to_dict(), self.ds.num_classes, self.ds.num_channels).to(self.device)
        mod.log = lambda *a, **k: None  # no trainer attached: logging is Lightning's business, not timed
        opt = torch.optim.AdamW([p for p in mod.parameters() if p.requires_grad], lr=1e-4)
        return mod, opt

    def step_fn(self, mod, opt, view: int | None = None):
        "One training step on batch `i` (`view` 1 or 2: that view alone, as a single-view batch)."
        def step(i: int):
            b = self.batches[i]
            if view == 2:
                b = {**b, "image1": b["image2"], "label1": b["label2"]}
            mod.on_train_batch_start(b, i)
            with self.autocast():
                loss = mod.training_step(b, i)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step


# ---------------------------------------------------------------------------------------------- measurements
def bench_hooks(b: Bench) -> dict:
    """Forward of the two-view batch with every hybrid tap hooked (Taps built per forward, as in training) vs plain.

    What the hooks add (a dict lookup and a reference per tap, the `Taps` object per step) is a fraction of a
    millisecond, below the scatter of one forward on a shared CPU (a few percent). So the two are timed in
    `hook_pairs` back-to-back pairs (order alternating) and the overhead is the median of the paired
    differences over the median plain forward: drift that hits both halves of a pair cancels."""
    from mars_nb.losses import MarsLoss
    mod, _ = b.module("rotaug")
    model = mod.model.train()
    mars = MarsLoss.from_config({"preset": "hybrid"}, model=model)
    images = [torch.cat([x["image1"], x["image2"]]) for x in b.batches]

    def plain(i):
        with b.autocast():
            out = model(pixel_values=images[i % len(images)])
        del out

    def hooked(i):
        with mars.taps(model) as taps, b.autocast():
            out = model(pixel_values=images[i % len(images)])
        taps.check()
        del out, taps

    def setup(i):  # the machinery alone: build the Taps, register and remove every hook (no forward)
        with mars.taps(model):
            pass

    raw: dict = {}
    interleaved({"plain": plain, "hooked": hooked}, b.spec["hook_pairs"], b.warmup, b.device, raw)
    diffs = np.array(raw["hooked"]) - np.array(raw["plain"])
    t_plain = statistics.median(raw["plain"])
    # 95% interval of the median paired difference (bootstrap): how far the ratio could be from the truth
    boot = np.median(np.random.default_rng(0).choice(diffs, (2000, len(diffs))), axis=1)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    t_setup = interleaved({"setup": setup}, 200, 5, b.device)["setup"]
    return {"forward_s.plain": t_plain, "forward_s.hooked": statistics.median(raw["hooked"]),
            "hook_pairs": len(diffs), "hook_overhead": 1 + float(np.median(diffs)) / t_plain,
            "hook_overhead_ci95_lo": 1 + float(lo) / t_plain, "hook_overhead_ci95_hi": 1 + float(hi) / t_plain,
            "hook_overhead_of_medians": statistics.median(raw["hooked"]) / t_plain,
            "hook_setup_s": t_setup}


def bench_steps(b: Bench) -> tuple[dict, dict]:
    "Training-step time of every variant, plus two single-view steps (mode none on view 1, then on view 2)."
    variants = b.spec["variants"]
    mods = {v: b.module(v) for v in variants}
    fns = {v: b.step_fn(*mods[v]) for v in variants}
    one, two = b.step_fn(*mods["none"], view=1), b.step_fn(*mods["none"], view=2)

    def two_single(i):
        one(i)
        two(i)

    fns["two-single"] = two_single
    raw: dict = {}
    t = interleaved(fns, b.repeats, b.warmup, b.device, raw)
    B = b.spec["batch"]
    out = {f"step_s.{v}": t[v] for v in fns}
    spreads = [x for x in map(spread, raw.values()) if x is not None]
    out["step_spread"] = statistics.median(spreads) if spreads else None
    for v in variants:
        out[f"train_images_per_s.{v}"] = (B if v == "none" else 2 * B) / t[v]
    out["mars_over_rotaug_step"] = t["mars-hybrid"] / t["rotaug"]
    out["batched_over_two_single"] = t["rotaug"] / t["two-single"]
    out["data_s_per_batch"] = statistics.median(b.data_s)
    return out, mods


class _Tiles:
    "A dataset whose test split is only the first `n` tiles (to keep the sweep of large presets short)."

    def __init__(self, ds, n: int | None):
        self._ds, self._n = ds, n

    def __getattr__(self, name):
        return getattr(self._ds, name)

    def test_tiles(self, *a, **k):
        specs = self._ds.test_tiles(*a, **k)
        return specs if self._n is None else specs[: self._n]


def bench_sweep(b: Bench, mods: dict) -> dict:
    "A 24-angle sweep against the sum of its parts (upright pass, extra cost of a quarter turn and of another angle)."
    from mars_nb.evaluate import sweep
    ds = _Tiles(b.ds, b.spec["sweep_tiles"])
    n_tiles = len(ds.test_tiles("test", b.spec["crop"]))
    kw = dict(batch_size=b.spec["sweep_batch"], tile_size=b.spec["crop"], progress=False)
    fns = {}
    for v in SWEEP_VARIANTS:
        model = mods[v][0].model.eval()

        def run(i, model=model, angles=SWEEP_ANGLES):
            with b.autocast():
                sweep(model, ds, angles, **kw)
        def parts(angles):
            def f(i, run=run):  # short: averaged over a few calls, or its noise would dominate the ratio
                for _ in range(ONE_ANGLE_CALLS):
                    run(i, angles=angles)
            return f
        fns[f"{v}/24"] = run
        fns[f"{v}/0"] = parts((0.0,))
        fns[f"{v}/0+90"] = parts((0.0, 90.0))
        fns[f"{v}/0+45"] = parts((0.0, 45.0))
    t = interleaved(fns, b.spec["sweep_repeats"], 1 if b.warmup else 0, b.device)
    out = {"sweep_tiles": n_tiles}
    lin, upright = [], []
    n_quarter = sum(a % 90 == 0 for a in SWEEP_ANGLES) - 1
    n_other = len(SWEEP_ANGLES) - 1 - n_quarter
    for v in SWEEP_VARIANTS:
        t0, t90, t45 = (t[f"{v}/{k}"] / ONE_ANGLE_CALLS for k in ("0", "0+90", "0+45"))
        out[f"sweep_s.{v}"] = t[f"{v}/24"]
        out[f"sweep_one_angle_s.{v}"] = t0
        out[f"sweep_extra_s_90.{v}"], out[f"sweep_extra_s_45.{v}"] = t90 - t0, t45 - t0
        out[f"sweep_images_per_s.{v}"] = n_tiles * len(SWEEP_ANGLES) / t[f"{v}/24"]
        lin.append(t[f"{v}/24"] / (t0 + n_quarter * (t90 - t0) + n_other * (t45 - t0)))
        upright.append(t[f"{v}/24"] / (len(SWEEP_ANGLES) * t0))
    out["sweep_linearity"] = statistics.mean(lin)
    out["sweep_over_24_upright"] = statistics.mean(upright)
    return out


def memory_child(preset: str, variant: str, device: str, precision: str, steps: int) -> dict:
    "Run in a fresh process: peak memory growth of `steps` training steps of `variant` (see the module docstring)."
    b = Bench(PRESETS[preset], device, precision, repeats=steps, warmup=0)
    # warm-up with a throw-away copy: lazy imports, thread pools and kernels' scratch space belong to
    # the baseline, not to the variant
    mod, opt = b.module(variant)
    b.step_fn(mod, opt)(0)
    del mod, opt
    with PeakMemory(device) as peak:
        mod, opt = b.module(variant)
        step = b.step_fn(mod, opt)
        for i in range(steps):
            step(i)
    return {"variant": variant, **peak.figures()}


def bench_memory(preset: str, device: str, precision: str, steps: int) -> dict:
    "Peak memory of every memory variant, each in its own child process."
    out, method = {}, None
    for v in MEMORY_VARIANTS:
        cmd = [sys.executable, __file__, "--memory-child", v, "--preset", preset, "--device", device,
               "--precision", precision, "--memory-steps", str(steps)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, **CHILD_ENV})
        if res.returncode != 0:
            raise RuntimeError(f"memory child for {v} failed:\n{res.stderr[-3000:]}")
        r = json.loads(res.stdout.strip().splitlines()[-1])
        out[f"memory_mb.{v}"] = r["growth_mb"]
        method = r["method"]
    out["memory_method"] = method
    out["mars_attention_over_rotaug_memory"] = out["memory_mb.mars-attention"] / out["memory_mb.rotaug"]
    return out


# ---------------------------------------------------------------------------------------------- report
def run_preset(preset: str, device: str, precision: str, repeats: int | None, warmup: int | None) -> dict:
    spec = PRESETS[preset]
    t0, other = time.perf_counter(), OtherLoad()
    b = Bench(spec, device, precision, repeats, warmup)
    res = {"preset": preset, "model": spec["model"], "overrides": json.dumps(spec["overrides"]), "crop": spec["crop"],
           "batch_per_view": spec["batch"], "precision": precision, "repeats": b.repeats, "warmup": b.warmup,
           **machine_info(device)}
    res.update(bench_hooks(b))
    steps, mods = bench_steps(b)
    res.update(steps)
    res.update(bench_sweep(b, mods))
    del mods
    gc.collect()
    res.update(bench_memory(preset, device, precision, spec["memory_steps"]))
    res["bench_seconds"] = time.perf_counter() - t0
    res["other_load_cores"] = other.cores()
    return res


def table(res: dict) -> str:
    "The figures of one preset as a text table."
    lines = [f"== {res['preset']}: {res['model']} at {res['crop']}x{res['crop']}, {res['batch_per_view']} images per view, "
             f"{res['device']} ({res.get('gpu') or res['cpu']}, {res['cpu_cores']} cores, {res['torch_threads']} torch threads), "
             f"torch {res['torch']}, {res['precision']}, median of {res['repeats']} after {res['warmup']} warm-up",
             f"{'ratio':36s} {'value':>8s} {'goal':>7s}  met"]
    for k, g in GOALS.items():
        lines.append(f"{k:36s} {res[k]:8.3f} {'<= ' + str(g):>7s}  {'yes' if res[k] <= g else 'NO'}")
    lines.append(f"{'variant':16s} {'step s':>8s} {'x rotaug':>8s} {'train img/s':>11s} {'sweep img/s':>11s} {'peak MB':>8s}")
    rot = res["step_s.rotaug"]
    for v in VARIANTS:
        if f"step_s.{v}" not in res:
            continue
        sw = res.get(f"sweep_images_per_s.{v}")
        mem = res.get(f"memory_mb.{v}")
        lines.append(f"{v:16s} {res[f'step_s.{v}']:8.4f} {res[f'step_s.{v}'] / rot:8.3f} "
                     f"{res[f'train_images_per_s.{v}']:11.1f} {'' if sw is None else f'{sw:11.1f}':>11s} "
                     f"{'' if mem is None else f'{mem:8.1f}':>8s}")
    lines.append(f"{'two single steps':16s} {res['step_s.two-single']:8.4f} {res['step_s.two-single'] / rot:8.3f}")
    sc = "n/a" if res["step_spread"] is None else f"{100 * res['step_spread']:.0f}%"
    lines.append(f"step times scatter by {sc} (interquartile range / median of the repeats); "
                 f"data: {res['data_s_per_batch']:.4f} s to sample and collate one batch of pairs (not in the steps)")
    lo, hi = res["hook_overhead_ci95_lo"], res["hook_overhead_ci95_hi"]
    lines.append(f"hook_overhead: median of {res['hook_pairs']} paired differences, 95% interval {lo:.3f}..{hi:.3f}; "
                 f"building, attaching and removing the taps alone takes {1000 * res['hook_setup_s']:.2f} ms "
                 f"({100 * res['hook_setup_s'] / res['forward_s.plain']:.1f}% of a forward)")
    lines.append(f"forward plain {res['forward_s.plain']:.4f} s, hooked {res['forward_s.hooked']:.4f} s; sweep "
                 f"{res['sweep_tiles']} tiles x 24 angles {res['sweep_s.rotaug']:.2f} s, upright alone "
                 f"{res['sweep_one_angle_s.rotaug']:.3f} s, a quarter turn +{res['sweep_extra_s_90.rotaug']:.3f} s, "
                 f"45 degrees +{res['sweep_extra_s_45.rotaug']:.3f} s (24 x upright: {res['sweep_over_24_upright']:.3f}); memory: {res['memory_method']}; "
                 f"benchmark took {res['bench_seconds']:.0f} s")
    other = res.get("other_load_cores")
    if other is not None and other > 0.05:
        lines.append(f"WARNING: other processes used {other:.2f} cores on average during this run; "
                     "the times above are distorted: rerun on an otherwise idle machine")
    return "\n".join(lines)


def out_name(preset: str, device: str) -> str:
    if device == "cuda":
        return "bench-gpu.json" if preset != "smoke" else "bench-gpu-smoke.json"
    return "bench.json" if preset == "tiny" else f"bench-{preset}.json"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", action="append", choices=list(PRESETS),
                   help="benchmark preset (repeatable; default tiny)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (median; default per preset)")
    p.add_argument("--warmup", type=int, default=None, help="discarded repeats before timing (default per preset)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"], help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--memory-steps", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out-dir", default="reports", help="where the JSON files go ('' to write none)")
    p.add_argument("--out", default=None, help="JSON path (only with a single --preset)")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    presets = a.preset or ["tiny"]
    precision = a.precision or ("bf16" if a.device == "cuda" else "fp32")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible")
    if a.memory_child:
        steps = a.memory_steps or PRESETS[presets[0]]["memory_steps"]
        print(json.dumps(memory_child(presets[0], a.memory_child, a.device, precision, steps)))
        return
    if a.out and len(presets) != 1:
        p.error("--out needs exactly one --preset")
    for preset in presets:
        res = run_preset(preset, a.device, precision, a.repeats, a.warmup)
        print(table(res), flush=True)
        path = Path(a.out) if a.out else (Path(a.out_dir) / out_name(preset, a.device) if a.out_dir else None)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(res, indent=1) + "\n")
            print(f"wrote {path}\n", flush=True)


if __name__ == "__main__":
    main()
