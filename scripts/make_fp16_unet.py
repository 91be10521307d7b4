"""A copy of a Stable Diffusion ONNX folder whose UNet is float16 in one file, as single-file fp16 exports ship.

    python3 scripts/make_fp16_unet.py [--src third_party/sd14-random] [--out third_party/sd14-fp16] [--force]

SD 1.x's float16 UNet holds 1.7 GB of weights: under protobuf's 2 GB, so exports keep it inside model.onnx (no
external data), unlike SDXL's. We cannot download one; this converts the full-size random-weight SD 1.4 UNet
(scripts/make_full_size_model.py) with onnxruntime's float16 converter (every float port and weight float16, as
`--dtype fp16` exports have them). Shape inference is off (it cannot run on a model over 2 GB), and without it
the converter also narrows the constant `scales` of the upsamplers' Resize, which ONNX requires in float32: they
are put back to float32, as a float16 torch trace writes them. The other parts are hard links to the source's.
"""
from __future__ import annotations

import _venv

if __name__ == "__main__":
    _venv.bootstrap(__file__)

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402

from _bench import REPO, say  # noqa: E402


def resize_scales_to_float32(model) -> int:
    """Resize's `scales` input back to float32 where a Constant feeds it; returns how many were."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    producer = {o: n for n in model.graph.node for o in n.output}
    fixed = 0
    for node in model.graph.node:
        if node.op_type != "Resize" or len(node.input) < 3 or not node.input[2]:
            continue
        const = producer.get(node.input[2])
        if const is None or const.op_type != "Constant":
            continue
        for a in const.attribute:
            if a.name == "value" and a.t.data_type == onnx.TensorProto.FLOAT16:
                wide = numpy_helper.to_array(a.t).astype(np.float32)
                a.t.CopyFrom(numpy_helper.from_array(wide, a.t.name))
                fixed += 1
    return fixed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=REPO / "third_party" / "sd14-random")
    ap.add_argument("--out", type=Path, default=REPO / "third_party" / "sd14-fp16")
    ap.add_argument("--force", action="store_true", help="rebuild when --out exists")
    args = ap.parse_args()
    if (args.out / "unet" / "model.onnx").exists() and not args.force:
        say(f"{args.out}: exists (--force rebuilds it)")
        return 0
    if not (args.src / "unet" / "model.onnx").exists():
        say(f"{args.src}: no unet/model.onnx; run scripts/make_full_size_model.py first")
        return 1
    import onnx
    from onnxruntime.transformers import float16

    staged = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(args.src, staged, ignore=shutil.ignore_patterns("unet"), copy_function=os.link)
    (staged / "unet").mkdir()
    say(f"converting {args.src / 'unet'} to float16")
    model = onnx.load(str(args.src / "unet" / "model.onnx"))
    model = float16.convert_float_to_float16(model, keep_io_types=False, disable_shape_infer=True)
    say(f"Resize scales kept in float32: {resize_scales_to_float32(model)}")
    onnx.save_model(model, str(staged / "unet" / "model.onnx"))
    shutil.rmtree(args.out, ignore_errors=True)
    staged.rename(args.out)
    size = (args.out / "unet" / "model.onnx").stat().st_size
    say(f"{args.out / 'unet' / 'model.onnx'}: {size / 2**30:.2f} GiB, one file")
    return 0


if __name__ == "__main__":
    sys.exit(main())
