"""llama.cpp itself against lorakit: greedy tokens of the exported merged GGUF (f32 / f16 / q8_0) and of
base GGUF + exported LoRA GGUF (`--lora`), each next to lorakit's own greedy generation on the same prompt ids.

llama.cpp comes from `llama-cpp-python`, built once from its source distribution with this machine's compilers
(there is no prebuilt CPU wheel for every platform) into a cache directory and imported from there; nothing is
installed into the environment. The first run builds for many minutes on a small machine; later runs reuse it.

    python benchmarks/gguf_llama_cpp.py                      # the default model, a seeded random adapter
    python benchmarks/gguf_llama_cpp.py --adapter runs/lorakit --tokens 32
    python benchmarks/gguf_llama_cpp.py --build-only         # just build / find llama-cpp-python

The random adapter (rsLoRA, a rank pattern and an alpha pattern: every per-module rule the LoRA export folds)
is scaled so that its greedy tokens differ from the base model's, which the table shows, so a LoRA file that
llama.cpp silently ignored could not pass.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LLAMA_CPP_VERSION = "0.3.36"
CMAKE_ARGS = (
    "-DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF "
    "-DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=ON -DGGML_OPENMP=OFF"
)


def llama_cpp_site(cache: Path, jobs: int) -> Path:
    """A directory holding an importable llama_cpp (and diskcache, which it imports): built and unpacked once.

    Raises:
        RuntimeError: the build failed (its log is in the cache directory).
    """
    site = cache / "site"
    if (site / "llama_cpp" / "__init__.py").is_file():
        return site
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    if not glob.glob(str(wheels / "llama_cpp_python-*.whl")):
        env = dict(
            os.environ, CMAKE_ARGS=CMAKE_ARGS, CMAKE_BUILD_PARALLEL_LEVEL=str(jobs), MAKEFLAGS=f"-j{jobs}"
        )
        log = cache / "build.log"
        print(f"building llama-cpp-python {LLAMA_CPP_VERSION} from source (log: {log}) ...", flush=True)
        cmd = [sys.executable, "-m", "pip", "wheel", f"llama-cpp-python=={LLAMA_CPP_VERSION}", "--no-deps",
               "--no-binary", "llama-cpp-python", "-w", str(wheels)]  # fmt: skip
        with open(log, "w") as f:
            if subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
                raise RuntimeError(f"llama-cpp-python did not build; see {log}")
    wheel = sorted(glob.glob(str(wheels / "llama_cpp_python-*.whl")))[-1]
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), wheel, "diskcache"],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    return site


def random_adapter(model, out: Path) -> Path:
    import torch

    import lorakit

    cfg = lorakit.LoraConfig(r=8, alpha=16, targets="all-linear", use_rslora=True,
                             rank_pattern={"k_proj": 4}, alpha_pattern={"o_proj": 4.0})  # fmt: skip
    lorakit.add_adapter(model, cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora." in name:
                p.add_(torch.randn(p.shape, generator=g) * (0.04 if name.endswith(".A") else 0.05))
    lorakit.save_adapter(model, out)
    lorakit.delete_adapter(model, "default")
    return out


def lorakit_greedy(model, ids: list[int], n: int) -> tuple[list[int], object]:
    import torch

    with torch.no_grad():
        first = model(torch.tensor([ids])).logits[0, -1]
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0)  # fmt: skip
    return out[0, len(ids) :].tolist(), first


def llama_greedy(llama_cls, ids: list[int], n: int, threads: int, **kwargs) -> tuple[list[int], object]:
    import numpy as np

    # logits_all: without it, the `scores` row read below did not hold the last token's logits in 0.3.36
    # (every run, the exported base without LoRA too, then differed from lorakit by ~30 at step 0).
    llm = llama_cls(
        n_ctx=len(ids) + n + 8, n_threads=threads, n_batch=512, logits_all=True, verbose=False, **kwargs
    )
    try:
        llm.eval(ids)
        first = np.array(llm.scores[llm.n_tokens - 1])
        toks = []
        for _ in range(n):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            toks.append(nxt)
            llm.eval([nxt])
    finally:
        llm.close()
    return toks, first


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--adapter", help="an adapter directory (default: a seeded random adapter)")
    ap.add_argument("--prompt", default="Write the date March 3rd, 2024 in ISO 8601 format.")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/lorakit/llama-cpp-python"))
    ap.add_argument("--build-jobs", type=int, default=1)
    ap.add_argument("--build-only", action="store_true")
    args = ap.parse_args()

    t0 = time.time()
    site = llama_cpp_site(Path(args.cache), args.build_jobs)
    sys.path.insert(0, str(site))
    from llama_cpp import Llama

    print(f"llama_cpp from {site} ({time.time() - t0:.0f} s)")
    if args.build_only:
        return 0

    import torch

    from lorakit.generation import format_prompt
    from lorakit.gguf import export_gguf, export_gguf_lora
    from lorakit.models import load_model

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="lorakit-gguf-"))
    base, tok = load_model(args.model)
    adapter = Path(args.adapter) if args.adapter else random_adapter(base, work / "adapter")
    ids = format_prompt(tok, args.prompt)
    base_toks, _ = lorakit_greedy(base, ids, args.tokens)
    model, _ = load_model(args.model, adapter=adapter)
    ref, ref_first = lorakit_greedy(model, ids, args.tokens)

    files = {
        q: export_gguf(args.model, adapter, work / f"merged-{q}.gguf", q).output
        for q in ("f32", "f16", "q8_0")
    }
    base_gguf = export_gguf(args.model, None, work / "base-f32.gguf", "f32").output
    lora_gguf = export_gguf_lora(adapter, args.model, work / "lora-f32.gguf")["output"]
    runs = {f"merged {q}": dict(model_path=str(p)) for q, p in files.items()}
    runs["base f32 + LoRA f32"] = dict(model_path=str(base_gguf), lora_path=str(lora_gguf))
    runs["base f32 (no LoRA)"] = dict(model_path=str(base_gguf))

    load = os.getloadavg()
    print(
        f"\nprompt {len(ids)} tokens, {args.tokens} greedy tokens; load average {load[0]:.1f} on {os.cpu_count()} cores"
    )
    print(f"lorakit base model's tokens differ from lorakit + adapter's at {_first_diff(base_toks, ref)}")
    print(f"\n{'llama.cpp run':<22} {'tokens = lorakit':>16} {'first diff':>10} {'max |Δlogit| step 0':>21}")
    ok = True
    for name, kw in runs.items():
        toks, first = llama_greedy(Llama, ids, args.tokens, args.threads, **kw)
        diff = float(abs(torch.from_numpy(first).float() - ref_first).max())
        same = toks == ref
        print(f"{name:<22} {str(same):>16} {_first_diff(toks, ref):>10} {diff:>21.4g}")
        if name != "base f32 (no LoRA)" and name != "merged q8_0":
            ok &= same
    print(f"\nlorakit:   {tok.decode(ref)!r}")
    return 0 if ok else 1


def _first_diff(a: list[int], b: list[int]) -> str:
    return next((str(i) for i, (x, y) in enumerate(zip(a, b)) if x != y), "-")


if __name__ == "__main__":
    sys.exit(main())
