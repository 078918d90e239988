"""README doc-test: every ``bash`` and ``python`` block of README.md runs, at tiny scale, as a user runs it.

Blocks. README.md may hold fenced blocks labelled ``bash`` (run), ``python`` (run) or ``text`` (output or a
listing shown to the reader, never run). An unlabelled fence, any other label, an indented code block (a line
indented by 4+ spaces after a blank line) or a stray ``readme-test`` comment fails
``test_readme_blocks_are_labelled_and_their_directives_apply``, so no new block escapes the doc-test.

Directives. The scaling of a block lives next to it, in HTML comments on the lines right above its fence
(invisible when rendered)::

    <!-- readme-test: replace "--rows 2000000" "--rows 256"; weights
    timm:vit_small_patch14_reg4_dinov2.lvd142m -->

One comment holds ``;``-separated directives (several comment lines may be stacked); arguments are words or
quoted strings, read with shell quoting (``'...'`` literally, ``"..."`` with ``\\"`` for a quote):

- ``replace OLD NEW``: run the block with every occurrence of OLD replaced by NEW. OLD must occur in the
  block, so a README edit that breaks the mapping fails loudly. Used to shrink rows, images, resolutions,
  batch sizes, process counts, and to swap a model too big to build here in seconds for a small one of the
  same family.
- ``setup CODE``: code run before the block, in the block's language and process (names a Python block uses
  without defining them, input files such as ``run.yaml``). Helpers for longer setups are in
  ``tests/readme_setup.py`` (on ``PYTHONPATH``).
- ``after CODE``: checks run after the block, in its language and process (e.g. an ``assert``).
- ``env NAME=VALUE``: an environment variable for the block.
- ``weights SPEC``: before the block runs, the fake Hub (``tests/fake_hub.py``) serves random weights for the
  ``load_vision_model`` spec SPEC where timm / open_clip download them, so the README's commands run exactly
  as written, with the weights "downloaded" from the Hub.
- ``release NAME SAE_ID``: the fake Hub serves a synthetic checkpoint in the published authors' layout at the
  path of that named release (what ``SAE.from_pretrained``, ``load_pretrained`` and ``convert`` download).
- ``language-model NAME``: the fake Hub serves a random model with the real config of TransformerLens's NAME
  (``tiny-stories-1M``) and a byte-level tokenizer, for the block that runs SAELens's own command line.
- ``continues``: a Python block that uses the names of the previous block (``model``, ``sae``, ...) runs in
  the same Python process, right after it.
- ``slow``: the block runs only in the slow test (below).

How blocks run. Every block runs in README order in one working directory (so ``sae-vision cache``, then
``train --cache``, then ``eval`` see each other's outputs), which holds image folders (``photos/``,
``val_photos/``, ``imgs/``, and ``~/data/val`` under a temporary ``HOME``) of the scikit-image sample photos,
and links to the repository's ``examples/``, ``Makefile``, ``pyproject.toml`` and ``constraints.txt`` (a user
runs the README from a checkout). A ``bash`` block runs with ``bash -euxo pipefail`` and ``.venv/bin`` first
on ``PATH``; a ``python`` block (with its ``continues`` successors) runs in one ``python`` subprocess, each
block compiled with its README line numbers, so a traceback names the README line. Every block must exit with
status 0; a failure prints the block as run and the tail of its output, and the remaining blocks still run (a
block that needed the failed one's output then fails too).

The Hub stands in for everything a block downloads or uploads: the ``fake_hub`` fixture points
``huggingface_hub`` (and, through the environment, every subprocess) at a local server, which also accepts
uploads (``push_to_hub``). Nothing is fetched from the network, yet every command takes its default path:
pretrained weights "downloaded", published SAEs loaded by release name.

Default and slow. ``test_readme_runs`` (default suite, ~4 min on a 2-core machine) runs every block not marked
``slow``: the install commands (``make -n``), the quickstart, training from Python and from the command line
(cache, train, eval), hooked models, the Matryoshka and RA-SAE APIs, loading a published SAE, splicing /
steering / naming concepts and the evaluation API. ``test_readme_runs_in_full`` (``-m slow``, ~11 min) runs
every block, ``slow`` ones included (the rest: weight records, example scripts, SAELens's own CLI, candidates,
convert, publish, dashboard, report, distributed training and caching). A default block must not depend on a
``slow`` block's output.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fake_hub import serve_random_weights

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RUN = ("bash", "python")
SHOWN = ("text",)
LINKED = ("examples", "Makefile", "pyproject.toml", "constraints.txt")  # what a checkout has beside README.md
BLOCK_TIMEOUT_S = 900
DIRECTIVE = re.compile(r"^<!-- readme-test: (.*) -->$")
FENCE = re.compile(r"^(```|~~~)(.*)$")


# ------------------------------------------------------------------------------------------------- parsing
@dataclass
class Directives:
    replace: list[tuple[str, str]] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)
    after: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    weights: list[str] = field(default_factory=list)
    releases: list[tuple[str, str]] = field(default_factory=list)
    language_models: list[str] = field(default_factory=list)
    continues: bool = False
    slow: bool = False


ARITY = {
    "replace": 2,
    "setup": 1,
    "after": 1,
    "env": 1,
    "weights": 1,
    "release": 2,
    "language-model": 1,
    "continues": 0,
    "slow": 0,
}


def parse_directives(comments: list[str]) -> Directives:
    """The directives of a block's ``<!-- readme-test: ... -->`` lines (ValueError on a malformed one)."""
    found = Directives()
    for comment in comments:
        lexer = shlex.shlex(comment, posix=True, punctuation_chars=";")
        lexer.whitespace_split = True
        words = list(lexer) + [";"]
        while words:
            end = words.index(";")
            name, args, words = words[0] if end else "", words[1:end], words[end + 1 :]
            if not name:
                continue
            if ARITY.get(name) != len(args):
                raise ValueError(f"readme-test directive {name!r} with {len(args)} argument(s): {comment!r}")
            if name == "replace":
                found.replace.append((args[0], args[1]))
            elif name == "env":
                key, sep, value = args[0].partition("=")
                if not sep:
                    raise ValueError(f"env needs NAME=VALUE: {comment!r}")
                found.env[key] = value
            elif name == "release":
                found.releases.append((args[0], args[1]))
            elif name == "language-model":
                found.language_models.append(args[0])
            elif name in ("continues", "slow"):
                setattr(found, name, True)
            else:
                getattr(found, name).append(args[0])
    return found


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    section: str
    language: str
    text: str
    directives: Directives

    @property
    def where(self) -> str:
        return f"README.md:{self.line} ({self.section})"

    def code(self) -> str:
        text = self.text
        for old, new in self.directives.replace:
            text = text.replace(old, new)
        return text


def read_readme(text: str) -> tuple[list[Block], list[str]]:
    """The fenced blocks of a README and the problems that break the doc-test's rules."""
    blocks: list[Block] = []
    problems: list[str] = []
    lines = text.splitlines()
    section = "top"
    comments: list[tuple[int, str]] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        number = i + 1
        directive = DIRECTIVE.match(line)
        fence = FENCE.match(line)
        if line.startswith("#"):
            section = line.lstrip("#").strip()
        if directive:
            comments.append((number, directive.group(1)))
            i += 1
            continue
        if "readme-test" in line:
            problems.append(
                f"README.md:{number}: a readme-test comment must be one line '<!-- readme-test: ... -->'"
            )
        if fence:
            marker, language = fence.group(1), fence.group(2).strip()
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == marker), None)
            if end is None:
                problems.append(f"README.md:{number}: fence never closed")
                break
            if language not in RUN + SHOWN:
                problems.append(
                    f"README.md:{number}: fence labelled {language!r}; label it bash, python or text"
                )
            try:
                directives = parse_directives([c for _, c in comments])
            except ValueError as error:
                problems.append(f"README.md:{comments[0][0]}: {error}")
                directives = Directives()
            if comments and language not in RUN:
                problems.append(
                    f"README.md:{comments[0][0]}: readme-test directives above a {language!r} block"
                )
            block = Block(number, section, language, "\n".join(lines[i + 1 : end]) + "\n", directives)
            for old, _ in directives.replace:
                if old not in block.text:
                    problems.append(f"{block.where}: replace {old!r}: the block does not contain it")
            if language in RUN:
                blocks.append(block)
            comments = []
            i = end + 1
            continue
        if comments:
            problems.append(f"README.md:{comments[0][0]}: readme-test comment not right above a fence")
            comments = []
        if line.startswith("    ") and line.strip() and i > 0 and not lines[i - 1].strip():
            problems.append(f"README.md:{number}: indented code block; put it in a ```bash / ```text fence")
        i += 1
    previous: Block | None = None
    for block in blocks:
        if block.directives.continues:
            if block.language != "python" or previous is None or previous.language != "python":
                problems.append(f"{block.where}: 'continues' needs a python block right after a python block")
            elif previous.directives.slow != block.directives.slow:
                problems.append(
                    f"{block.where}: 'continues' joins blocks that are not both slow or both fast"
                )
        previous = block
    return blocks, problems


def test_readme_blocks_are_labelled_and_their_directives_apply():
    blocks, problems = read_readme(README.read_text(encoding="utf-8"))
    assert not problems, "\n".join(problems)
    assert {b.language for b in blocks} == {"bash", "python"}
    assert any(not b.directives.slow for b in blocks) and any(b.directives.slow for b in blocks)


def test_the_readme_rules_catch_escaping_blocks():
    text = "# T\n```\nsae-vision eval x\n```\n```sh\nls\n```\nText\n\n    python examples/capture.py\n"
    text += '<!-- readme-test: replace "--rows 9" "--rows 1" -->\n```bash\nsae-vision train --rows 8\n```\n'
    text += "<!-- readme-test: slow -->\n\nText\n"
    _, problems = read_readme(text)
    assert len(problems) == 5, problems
    for expected in (
        "labelled ''",
        "labelled 'sh'",
        "indented code block",
        "does not contain it",
        "not right above",
    ):
        assert any(expected in p for p in problems), (expected, problems)


def test_the_fake_hub_takes_uploads(fake_hub, tmp_path, monkeypatch):
    """The README's ``push_to_hub`` block uploads to the fake Hub: repo creation, files and folders, read
    back."""
    from huggingface_hub import HfApi, hf_hub_download

    monkeypatch.setenv("HF_TOKEN", "hf_test")
    api = HfApi()
    api.create_repo("me/saes")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "weights.safetensors").write_bytes(b"\x00" * 100)
    api.upload_folder(folder_path=tmp_path / "folder", path_in_repo="hook", repo_id="me/saes")
    api.upload_file(path_or_fileobj=b"# card\n", path_in_repo="README.md", repo_id="me/saes")
    assert fake_hub.uploaded() == [("me/saes", "hook/weights.safetensors"), ("me/saes", "README.md")]
    assert Path(hf_hub_download("me/saes", "hook/weights.safetensors")).read_bytes() == b"\x00" * 100
    assert Path(hf_hub_download("me/saes", "README.md")).read_text() == "# card\n"


# ------------------------------------------------------------------------------------------------- running
def write_photos(folder: Path, photos) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, photo in enumerate(photos):
        photo.save(folder / f"photo_{i:02d}.jpg", quality=90)


def make_workdir(root: Path) -> tuple[Path, Path]:
    """A checkout-like working directory with image folders, and a temporary HOME (for ``~``)."""
    from sae_vision_ext.activations.sample_images import sample_images

    work, home = root / "work", root / "home"
    photos = sample_images(12)
    write_photos(work / "photos", photos[:8])
    write_photos(work / "val_photos", photos[8:])
    write_photos(work / "imgs", photos[8:])
    write_photos(home / "data" / "val", photos[8:])
    for name in LINKED:
        (work / name).symlink_to(ROOT / name)
    return work, home


def serve_msae_release(hub, release: str, sae_id: str) -> None:
    """A random checkpoint in the MSAE authors' layout, served at the release's path in its repo."""
    import fnmatch

    import numpy as np
    import open_clip
    import torch

    from sae_vision_ext.loading import RELEASES

    info = RELEASES[release]
    arch = info.model.split(":", 1)[1].split("/")[0]
    d = open_clip.get_model_config(arch)["embed_dim"]
    n = 8 * d
    path = info.saes[sae_id]
    if "*" in path:  # the published name pattern, made concrete
        concrete = path.replace("*_TopKReLU", f"{n}_{d}_TopKReLU").replace("RW_*", "RW_False_False_0.0")
        path = concrete.replace("train_image_*", f"train_image_1000_{d}")
        assert fnmatch.fnmatchcase(path, info.saes[sae_id]), path
    g = torch.Generator().manual_seed(0)
    decoder = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    checkpoint = {
        "model": {
            "pre_bias": torch.zeros(d),
            "encoder": decoder.T.contiguous(),
            "latent_bias": torch.zeros(n),
            "decoder": decoder,
            "stats_last_nonzero": torch.zeros(n, dtype=torch.long),
        },
        "mean_center": torch.randn(d, generator=g) * 0.1 if sae_id == "centered" else torch.zeros(d),
        "scaling_factor": 1.0,
        "target_norm": np.float64(d**0.5),
    }
    local = hub.root / info.repo_id.replace("/", "--") / path
    local.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, local)
    hub.serve(info.repo_id, path, local)


# TransformerLens model names a README block may use -> (Hub repo, transformers config of a random stand-in)
LANGUAGE_MODELS = {
    "tiny-stories-1M": (
        "roneneldan/TinyStories-1M",
        dict(
            model_type="gpt_neo",
            vocab_size=50257,
            max_position_embeddings=2048,
            hidden_size=64,
            num_layers=8,
            num_heads=16,
            attention_types=[[["global", "local"], 4]],
            window_size=256,
            bos_token_id=50256,
            eos_token_id=50256,
        ),
    ),
}


def serve_language_model(hub, name: str) -> None:
    """A random model with the real config of TransformerLens's ``name``, and a byte-level tokenizer, served
    from its Hub repo (config, weights, tokenizer: what ``HookedTransformer.from_pretrained`` downloads)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    repo_id, config = LANGUAGE_MODELS[name]
    folder = hub.root / repo_id.replace("/", "--")
    config = dict(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(AutoConfig.for_model(**config)).save_pretrained(folder)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # 256 byte symbols, no merges: ids 0..255 + <eos>
    tokenizer = Tokenizer(models.BPE(vocab={symbol: i for i, symbol in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    special = "<|endoftext|>"
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=special, eos_token=special, unk_token=special
    ).save_pretrained(folder)
    for path in folder.iterdir():
        hub.serve(repo_id, path.name, path)


@dataclass
class Outcome:
    blocks: list[Block]
    seconds: float
    ok: bool
    report: str = ""


PYTHON_DRIVER = """
import json, sys
ns = {"__name__": "__main__"}
for where, filename, code in json.load(open(sys.argv[1])):
    print(f"[readme-test] running {where}", file=sys.stderr, flush=True)
    exec(compile(code, filename, "exec"), ns)
"""


class ReadmeRunner:
    """Runs README blocks in order in one working directory, with the fake Hub serving what they download."""

    def __init__(self, hub, work: Path, home: Path):
        import matplotlib

        self.hub, self.work = hub, work
        self.served: set = set()
        self.env = dict(os.environ)
        self.env.pop(
            "TRANSFORMERS_OFFLINE", None
        )  # online, like a user: the fake Hub answers (HF_HUB_OFFLINE=0)
        self.env.update(
            {
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                "HOME": str(home),
                "PYTHONPATH": str(Path(__file__).parent),  # readme_setup, for the setup snippets
                # the real one: no font cache rebuilt under the new HOME
                "MPLCONFIGDIR": matplotlib.get_configdir(),
                "PYTHONUNBUFFERED": "1",
            }
        )

    def serve(self, block: Block) -> None:
        for spec in block.directives.weights:
            if spec not in self.served:
                serve_random_weights(self.hub, spec, seed=0)
                self.served.add(spec)
        for release in block.directives.releases:
            if release not in self.served:
                serve_msae_release(self.hub, *release)
                self.served.add(release)
        for name in block.directives.language_models:
            if name not in self.served:
                serve_language_model(self.hub, name)
                self.served.add(name)

    def run_unit(self, unit: list[Block]) -> Outcome:
        for block in unit:
            self.serve(block)
        env = dict(self.env)
        for block in unit:
            env.update(block.directives.env)
        start = time.perf_counter()
        if unit[0].language == "bash":
            block = unit[0]
            script = "\n".join([*block.directives.setup, block.code(), *block.directives.after])
            command = ["bash", "-euxo", "pipefail", "-c", script]
            shown = script
        else:
            parts = []
            for block in unit:
                for i, code in enumerate(block.directives.setup):
                    parts.append(
                        [f"setup of {block.where}", f"<readme-test setup {i} of {block.where}>", code]
                    )
                parts.append([block.where, "README.md", "\n" * block.line + block.code()])
                for i, code in enumerate(block.directives.after):
                    parts.append([f"after {block.where}", f"<readme-test after {i} of {block.where}>", code])
            program = self.work.parent / f"readme_block_{unit[0].line}.json"
            program.write_text(json.dumps(parts))
            command = [sys.executable, "-c", PYTHON_DRIVER, str(program)]
            shown = "\n\n".join(f"# {where}\n{code.lstrip(chr(10))}" for where, _, code in parts)
        # a session of its own: on a timeout the whole process group goes (torchrun's workers, sae-vision ...)
        process = subprocess.Popen(
            command,
            cwd=self.work,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            output, _ = process.communicate(timeout=BLOCK_TIMEOUT_S)
            ok, status = process.returncode == 0, f"exit status {process.returncode}"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            ok, status = False, f"timed out after {BLOCK_TIMEOUT_S} s"
        seconds = time.perf_counter() - start
        report = (
            ""
            if ok
            else (
                f"=== {unit[0].where}: {status}\n--- as run (cwd {self.work}):\n{shown}\n--- output (tail):\n"
                f"{output[-6000:]}"
            )
        )
        return Outcome(unit, seconds, ok, report)

    def run(self, blocks: list[Block]) -> list[Outcome]:
        units: list[list[Block]] = []
        for block in blocks:
            if block.directives.continues and units:
                units[-1].append(block)
            else:
                units.append([block])
        outcomes = []
        for unit in units:
            outcome = self.run_unit(unit)
            print(
                f"{outcome.seconds:7.1f} s  {'ok  ' if outcome.ok else 'FAIL'}  "
                f"{', '.join(b.where for b in unit)}",
                flush=True,
            )
            outcomes.append(outcome)
        return outcomes


def run_readme(fake_hub, tmp_path, include_slow: bool) -> None:
    blocks, problems = read_readme(README.read_text(encoding="utf-8"))
    assert not problems, "\n".join(problems)
    chosen = [b for b in blocks if include_slow or not b.directives.slow]
    work, home = make_workdir(tmp_path)
    start = time.perf_counter()
    outcomes = ReadmeRunner(fake_hub, work, home).run(chosen)
    print(f"{time.perf_counter() - start:7.1f} s  total, {len(chosen)} blocks")
    failures = [o.report for o in outcomes if not o.ok]
    assert not failures, f"{len(failures)} README block(s) failed:\n\n" + "\n\n".join(failures)


def test_readme_runs(fake_hub, tmp_path):
    run_readme(fake_hub, tmp_path, include_slow=False)


@pytest.mark.slow
def test_readme_runs_in_full(fake_hub, tmp_path):
    run_readme(fake_hub, tmp_path, include_slow=True)
