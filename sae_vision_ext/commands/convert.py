"""``sae-vision convert``: a foreign SAE checkpoint (MSAE authors', overcomplete) into a SAELens folder."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import MISSING, dataclass

from sae_vision_ext.commands._common import (
    CONFIG_DEST,
    UserError,
    add_config,
    new_parser,
    one_line_errors,
    parse,
)
from sae_vision_ext.training.config import option

# loading.convert.FORMATS, spelled out: importing loading.convert imports SAELens (--help stays instant);
# tests/loading/test_loading_convert.py checks that the two agree
FORMATS = ("auto", "msae", "overcomplete")

DESCRIPTION = """Convert a foreign SAE checkpoint once into a SAELens folder (cfg.json +
sae_weights.safetensors). Sources: a local .pth file, a Hub file hf://org/repo/path/in/repo.pth, or a named
release with --sae-id. Formats: the MSAE authors' layout (msae) and the overcomplete toolbox (overcomplete);
auto tells them apart from the file's contents. Every file is read with the restricted unpickler. The result
loads with SAE.load_from_disk(OUT_DIR) after `import sae_vision_ext`."""

EPILOG = """examples:
  sae-vision convert msae-clip-vit-l-14 out/msae-l14 --sae-id centered
  FILE=ViT-L_14/centered/6144_768_TopKReLU_64_RW_False_False_0.0_cc3m_ViT-L~14_train_image_2905936_768.pth
  sae-vision convert hf://WolodjaZ/MSAE/$FILE out/msae-l14
  sae-vision convert ra_sae.pth out/ra-sae --format overcomplete --sparsity topk --k 32 \\
      --model timm:vit_base_patch14_reg4_dinov2.lvd142m --hook blocks.11.hook_resid_post
then: import sae_vision_ext; from sae_lens import SAE; SAE.load_from_disk('out/msae-l14')
"""


@dataclass
class ConvertConfig:
    """The checkpoint, where to write it, and what to record about it."""

    source: str = option(
        MISSING,
        positional=True,
        metavar="SOURCE",
        help="a .pth file, hf://org/repo/path/in/repo.pth, or a release name",
    )
    out_dir: str = option(
        MISSING, positional=True, metavar="OUT_DIR", help="output folder (cfg.json + sae_weights.safetensors)"
    )
    sae_id: str | None = option(None, help="SAE id within the release (when SOURCE is a release name)")
    format: str = option("auto", choices=FORMATS, help="checkpoint layout")
    model_name: str | None = option(None, "--model", help="model spec to record (open_clip:ViT-L-14/openai)")
    hook_name: str | None = option(None, "--hook", help="hook the SAE reads, e.g. hook_image_embed")
    k: int | None = option(None, help="msae: default inference TopK (None: ReLU); overcomplete: TopK k")
    sparsity: str | None = option(
        None, choices=("relu", "topk", "threshold"), help="overcomplete: sparsity rule"
    )
    threshold: float | None = option(None, help="overcomplete BatchTopK: eval threshold")
    delta: float | None = option(None, help="overcomplete RA-SAE: relaxation radius (None: the file's, or 1)")


def build_parser(argv: Sequence[str] = ()):
    parser = new_parser("sae-vision convert", DESCRIPTION, EPILOG)
    add_config(parser, ConvertConfig)
    return parser


@one_line_errors("convert")
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg: ConvertConfig = getattr(parse(build_parser(argv), argv), CONFIG_DEST)
    options = {"k": cfg.k}
    if cfg.format != "msae":
        options.update(sparsity=cfg.sparsity, threshold=cfg.threshold, delta=cfg.delta)
    # heavy: imported when the command runs, so --help stays instant
    from sae_vision_ext.loading.convert import convert_checkpoint
    from sae_vision_ext.loading.safe_load import UnsafeCheckpointError

    try:
        out = convert_checkpoint(
            cfg.source,
            cfg.out_dir,
            sae_id=cfg.sae_id,
            format=cfg.format,
            metadata={"model_name": cfg.model_name, "hook_name": cfg.hook_name},
            **options,
        )
    except UnsafeCheckpointError as err:  # a refusal to read the file, not a crash
        raise UserError(str(err)) from err
    print(f"wrote {out / 'cfg.json'} and {out / 'sae_weights.safetensors'}")
    return 0
