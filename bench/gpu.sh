#!/usr/bin/env bash
# Benchmark row 7 (GPU) as ONE call of the device tool. Not run yet: no session that built
# the harness was lent a GPU. See BENCHMARKS.md section 7 for what it measures and its limits.
#
# 1. On the dev machine, stage the small inputs the GPU machine cannot fetch (a 20k-row SST-2
#    subsample + dev, and MiniLM's tokenizer: ~2 MB together) into .bench-gpu/, which
#    .git/info/exclude keeps out of git (it is never committed; remove it afterwards):
#        bash bench/gpu.sh --stage
# 2. One device call (about 5-8 minutes of GPU time; the whole session budget is 15 min):
#        run(command="bash bench/gpu.sh", carry=[".bench-gpu"], timeout_s=560)
#    Figures come back as $OUT/gpu.json (+ gpu.log); copy gpu.json to bench/results/ and run
#    `python -m bench report`, then write the prose of section 7 from it. Each training part
#    measures the card's own ceiling in the same run (bf16 and fp32 matmul FLOP/s at the model's
#    shapes, copy bandwidth, dense peak: bench/ceiling.py) and reports every side's model FLOP/s,
#    MFU against the bf16 ceiling and what limits it; `grep MFU gpu.log` shows them as they land.
# 3. bash bench/gpu.sh --unstage
#
# The device image has torch, transformers, accelerate, pandas, pyarrow — but not Ray, MLflow,
# pydantic, FastAPI or uvicorn, and Ray's wheel (79 MB for cp312) is larger than the 64 MiB a
# call can carry. So a one-call run measures the baselines (plain loop eager/compiled, HF
# Trainer, the plain loop with raypipe's length-grouped batching) and records every raypipe
# side as "skipped: <why>". A machine with raypipe installed (`make install CONSTRAINTS=`) runs
# all of it: `python -m bench gpu`.
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=.bench-gpu

if [[ "${1:-}" == "--stage" ]]; then
    grep -qx "/$STAGE/" .git/info/exclude 2>/dev/null || echo "/$STAGE/" >> .git/info/exclude
    mkdir -p "$STAGE/sst2"
    PY=${PYTHON:-.venv/bin/python}
    "$PY" - "$STAGE" <<'PYEOF'
import sys
from pathlib import Path
from bench import common as C
out = Path(sys.argv[1])
C.sst2_frame("train", n=20_000, seed=0).rename(columns={"text": "sentence"}).to_csv(out / "sst2/train.tsv", sep="\t", index=False)
C.sst2_frame("dev").rename(columns={"text": "sentence"}).to_csv(out / "sst2/dev.tsv", sep="\t", index=False)
from transformers import AutoTokenizer
AutoTokenizer.from_pretrained(C.minilm_dir()).save_pretrained(out / "tokenizer")
PYEOF
    du -sh "$STAGE"
    exit 0
fi
if [[ "${1:-}" == "--unstage" ]]; then
    rm -rf "$STAGE"
    exit 0
fi

export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
export RAYPIPE_BENCH_SST2="$PWD/$STAGE/sst2" RAYPIPE_BENCH_TOKENIZER="$PWD/$STAGE/tokenizer"
OUTDIR="${OUT:-bench/results}"
mkdir -p "$OUTDIR"
PY=python3
[[ -x .venv/bin/python ]] && PY=.venv/bin/python
if [[ -d "$STAGE/whl" ]]; then   # optional extra wheels (pydantic, fastapi, uvicorn, ...)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$STAGE"/whl/*.whl
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUTDIR/gpu.log" || true
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUTDIR/gpu.log"
timeout 520 "$PY" -m bench gpu --out "$OUTDIR" "$@" 2>&1 | tee -a "$OUTDIR/gpu.log"
