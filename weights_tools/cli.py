"""``eep-shards``: prepare, verify and inspect per-expert safetensors shards.

    eep-shards prepare CHECKPOINT_DIR OUT_DIR [--quiet] [--force] [--workers N]
    eep-shards verify OUT_DIR [--no-sha256]       exit 1 and list every problem if any
    eep-shards inspect OUT_DIR [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

from weights_tools.errors import ShardError
from weights_tools.manifest import Manifest
from weights_tools.prepare import prepare
from weights_tools.verify import verify_shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eep-shards", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="split a Hugging Face MoE checkpoint into per-expert shards")
    p.add_argument("checkpoint_dir")
    p.add_argument("out_dir")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--force", action="store_true",
                   help="rewrite even if OUT_DIR is up to date, and write into a non-empty OUT_DIR that is not a shard set")
    p.add_argument("--workers", type=int, default=None, help="files written in parallel (default min(4, CPUs))")
    v = sub.add_parser("verify", help="check every file and checksum against the manifest")
    v.add_argument("out_dir")
    v.add_argument("--no-sha256", action="store_true", help="check headers, shapes and sizes only")
    i = sub.add_parser("inspect", help="summarise a shard directory")
    i.add_argument("out_dir")
    i.add_argument("--json", action="store_true", help="print the architecture section as JSON")
    args = parser.parse_args(argv)

    try:
        if args.command == "prepare":
            result = prepare(args.checkpoint_dir, args.out_dir, quiet=args.quiet, force=args.force,
                             num_workers=args.workers)
            m = result.manifest
            state = "up to date" if result.is_up_to_date else \
                f"wrote {result.nbytes_written / 1e6:,.1f} MB in {result.seconds:.2f} s"
            print(f"{args.out_dir}: {m.num_experts} experts x {len(m.moe_layers)} MoE layers "
                  f"({m.architecture['layout']}); {state}")
            return 0
        if args.command == "verify":
            problems = verify_shards(args.out_dir, check_sha256=not args.no_sha256)
            for problem in problems:
                print(f"PROBLEM {problem}")
            if problems:
                print(f"{args.out_dir}: {len(problems)} problem(s)", file=sys.stderr)
                return 1
            print(f"{args.out_dir}: OK")
            return 0
        return _inspect(args.out_dir, as_json=args.json)
    except ShardError as exc:
        print(f"eep-shards {args.command}: {exc}", file=sys.stderr)
        return 2


def _inspect(out_dir: str, *, as_json: bool) -> int:
    m = Manifest.load(out_dir)
    if as_json:
        print(json.dumps({"architecture": m.architecture, "source": m.source, "files": len(m.files),
                          "nbytes": sum(m.files.values())}, indent=1))
        return 0
    a = m.architecture
    roles = Counter((t.role + ("_scale" if t.part == "scale" else "")) if t.role else "non-expert" for t in m.tensors)
    quant = m.quantization
    quant_text = "unquantised" if quant is None else \
        (f"{quant['method']} {quant['fmt']}, {quant['weight_block_size'][0]}x{quant['weight_block_size'][1]} "
         f"block scales ({quant['scale_dtype']}), {quant['activation_scheme']} activations")
    print(f"shard set    {out_dir} (manifest sha256 {m.digest[:16]}...)")
    print(f"source       {m.source.get('path')} (config sha256 {str(m.source.get('config_sha256'))[:16]}...)")
    print(f"architecture {a.get('model_type')} {a.get('architectures')}, layout {a.get('layout')}")
    print(f"experts      {m.num_experts} per layer, top-k {a.get('top_k')}, norm_topk_prob {a.get('norm_topk_prob')}")
    print(f"MoE layers   {len(m.moe_layers)}: {m.moe_layers}")
    print(f"sizes        hidden {m.hidden_size}, moe intermediate {m.intermediate_size}, dtype {a.get('dtype')}")
    print(f"quantisation {quant_text}")
    print(f"tensors      {dict(roles)}")
    print(f"files        {len(m.files)}, {sum(m.files.values()) / 1e6:,.1f} MB; one expert of one layer "
          f"{m.expert_nbytes(m.moe_layers[0], 0) / 1e6:,.3f} MB" if m.moe_layers else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
