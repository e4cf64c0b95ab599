"""The adapter toolbox (extract, resize, merge, bake) on the tiny pipeline: round trips, errors against plain-torch
references, refusals, and reloading every output through ``load_dora_weights``."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dora_diffusion.cli import main
from dora_diffusion.formats import AdapterFileError
from dora_diffusion.testing import build_tiny_sdxl_pipeline, save_tiny_sdxl_pipeline
from dora_diffusion.tools import ModelFolder, bake, extract, merge_adapters, merge_into_base, resize

# (component, module name, weight shape, rank): Linear and Conv2d, UNet and a text encoder
MODULES = [
    ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", (64, 64), 4),
    ("unet", "up_blocks.0.resnets.2.conv1", (64, 128, 3, 3), 4),
    ("unet", "mid_block.attentions.0.transformer_blocks.0.ff.net.2", (64, 256), 4),
    ("text_encoder", "text_model.encoder.layers.0.mlp.fc1", (128, 32), 4),
]
ALPHA = 6.0


def make_adapter(path, w0s: dict, use_dora: bool, seed: int) -> dict:
    """A diffusers-dialect adapter file with random A, B (and m) on MODULES; returns its tensors per module."""
    g = torch.Generator().manual_seed(seed)
    sd, tensors = {}, {}
    for comp, name, shape, r in MODULES:
        a = torch.randn(r, *shape[1:], generator=g) * 0.2
        b = torch.randn(shape[0], r, *((1, 1) if len(shape) == 4 else ()), generator=g) * 0.2
        sd[f"{comp}.{name}.lora_A.weight"], sd[f"{comp}.{name}.lora_B.weight"] = a, b
        m = None
        if use_dora:
            m = w0s[comp, name].reshape(shape[0], -1).norm(dim=1) * (0.7 + 0.6 * torch.rand(shape[0], generator=g))
            sd[f"{comp}.{name}.lora_magnitude_vector"] = m.reshape(1, -1, 1, 1) if len(shape) == 4 else m
        tensors[comp, name] = (a, b, m)
    config = {f"{c}.{k}": v for c in ("unet", "text_encoder") for k, v in
              {"r": 4, "lora_alpha": ALPHA, "use_dora": use_dora, "target_modules": ["x"]}.items()}  # fmt: skip
    save_file(sd, path, {"format": "pt", "lora_adapter_metadata": json.dumps(config)})
    return tensors


def ref_weight(w0: torch.Tensor, a, b, m=None, k: float = 1.0, alpha: float = ALPHA) -> torch.Tensor:
    """Plain torch, fp64: ``W0 + k (W' - W0)`` with ``W' = diag(m / ||W0 + sBA||)(W0 + sBA)`` (LoRA: no m)."""
    r = a.shape[0]
    w = w0.double().reshape(w0.shape[0], -1)
    v = w + (alpha / r) * b.double().reshape(b.shape[0], r) @ a.double().reshape(r, -1)
    wp = v if m is None else v * (m.double() / v.norm(dim=1))[:, None]
    return (w + k * (wp - w)).reshape(w0.shape)


def row(report, name: str):
    """The report's row for module ``name`` (named with or without CLIP's ``text_model.``, as the base names it)."""
    return next(r for r in report.rows if r.module.removeprefix("text_model.") == name.removeprefix("text_model."))


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.double() - y.double()).norm() / y.double().norm())


def file_weights(path, folder: ModelFolder) -> dict:
    """W' of every module of the adapter file at ``path``, through the loader: load, fuse, read the fused weights."""
    pipe = build_tiny_sdxl_pipeline()
    pipe.load_dora_weights(path)
    pipe.fuse_dora()
    return {(c, n): getattr(pipe, c).get_submodule(n.removeprefix("text_model.")).weight.detach().clone()
            for c, n, _, _ in MODULES}  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny base folder, a DoRA and a LoRA for it, and the DoRA fused into the base (a 'fine-tuned' folder)."""
    root = tmp_path_factory.mktemp("tools")
    base = save_tiny_sdxl_pipeline(root / "base")
    folder = ModelFolder(base)
    w0s = {(c, n): folder.weight(c, n).float() for c, n, _, _ in MODULES}
    dora = make_adapter(root / "dora.safetensors", w0s, True, seed=1)
    lora = make_adapter(root / "lora.safetensors", w0s, False, seed=2)
    fused = merge_into_base([root / "dora.safetensors"], base, root / "finetuned")
    merge_into_base([root / "lora.safetensors"], base, root / "finetuned_lora")
    return {"root": root, "base": base, "folder": folder, "w0": w0s, "dora": dora, "lora": lora, "fused": fused}


def test_merge_into_base_fuses_the_reference_weights(world) -> None:
    ft = ModelFolder(world["root"] / "finetuned")
    for c, n, _, _ in MODULES:
        a, b, m = world["dora"][c, n]
        assert rel(ft.weight(c, n), ref_weight(world["w0"][c, n], a, b, m)) < 1e-6
    assert torch.equal(ft.weight("unet", "conv_in"), world["folder"].weight("unet", "conv_in"))  # not adapted
    info = json.loads((world["root"] / "finetuned" / "dora_diffusion_merge.json").read_text())
    assert info["made_by"] == "dora-diffusion merge --into-base" and info["settings"] == {"strengths": [1.0], "fp16": False}
    assert world["fused"].exact and f"fused {len(MODULES)} modules of 1 adapters into {world['base']}" in world["fused"].notes
    half = merge_into_base([world["root"] / "lora.safetensors"], world["base"], world["root"] / "fp16", [0.5], fp16=True)
    c, n, _, _ = MODULES[1]
    a, b, _ = world["lora"][c, n]
    w = ModelFolder(world["root"] / "fp16").weight(c, n)
    assert not half.exact and w.dtype == torch.float16
    want = ref_weight(world["w0"][c, n], a, b, None, k=0.5)
    assert bool(((w.double() - want).abs() <= want.abs() * 2**-11 + 2**-25).all())  # fp16 rounding: half an ulp


@pytest.mark.parametrize("kind", ["dora", "lora"])
def test_extract_own_merged_model_gives_the_adapter_back(world, kind) -> None:
    root = world["root"]
    source = "dora" if kind == "dora" else "lora"
    ft = root / ("finetuned" if kind == "dora" else "finetuned_lora")
    out = root / f"extracted_{kind}.safetensors"
    report = extract(ft, world["base"], out, rank=4, kind=kind, overwrite=True)
    assert {(r.component, r.module) for r in report.rows} == {(c, n.removeprefix("text_model.")) for c, n, _, _ in MODULES}
    assert all(r.rank == 4 and r.error < 1e-4 for r in report.rows)
    got = file_weights(out, world["folder"])
    for c, n, _, _ in MODULES:
        a, b, m = world[source][c, n]
        assert rel(got[c, n], ref_weight(world["w0"][c, n], a, b, m)) < 1e-4, (c, n)
    header = safe_open(out, "pt").metadata()
    made = json.loads(header["dora_diffusion"])
    assert made["made_by"] == "dora-diffusion extract" and made["settings"]["kind"] == kind
    if kind == "dora":  # m = the fine-tuned row norms, exactly
        ftw = ModelFolder(ft).weight("unet", MODULES[1][1]).double().reshape(64, -1).norm(dim=1).float()
        assert torch.equal(load_file(out)[f"unet.{MODULES[1][1]}.lora_magnitude_vector"].reshape(-1), ftw)


def test_extract_lower_rank_error_is_the_svd_tail_and_energy_picks_ranks(world) -> None:
    root, (c, n, shape, _) = world["root"], MODULES[0]
    ft = ModelFolder(root / "finetuned_lora")
    report = extract(ft.path, world["base"], root / "e2.safetensors", rank=2, kind="lora", components=["unet"], overwrite=True)
    delta = (ft.weight(c, n).double() - world["w0"][c, n].double()).reshape(shape[0], -1)
    s = torch.linalg.svdvals(delta)
    assert row(report, n).change_error == pytest.approx(float(s[2:].norm() / s.norm()), rel=1e-4)
    assert {r.component for r in report.rows} == {"unet"}
    energy = extract(ft.path, world["base"], root / "e3.safetensors", energy=0.9, kind="lora", components=["unet"], overwrite=True)
    kept = torch.cumsum(s**2, 0) / (s**2).sum()
    assert row(energy, n).rank == int((kept < 0.81).sum()) + 1


@pytest.mark.exactness
def test_resize_same_rank_is_exact_and_lower_keeps_magnitudes(world) -> None:
    root = world["root"]
    same = resize(root / "dora.safetensors", root / "same.safetensors", rank=4, overwrite=True)
    a, b = load_file(root / "dora.safetensors"), load_file(root / "same.safetensors")
    assert same.exact and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    low = resize(root / "dora.safetensors", root / "low.safetensors", rank=2, base=world["base"], overwrite=True)
    c = {k.replace("text_encoder.text_model.", "text_encoder."): v for k, v in load_file(root / "low.safetensors").items()}
    a = {k.replace("text_encoder.text_model.", "text_encoder."): v for k, v in a.items()}  # --base: the model's names
    assert all(torch.equal(c[k], a[k]) for k in a if k.endswith("magnitude_vector"))
    assert all(c[k].shape[0] == 2 for k in c if k.endswith("lora_A.weight"))
    got = file_weights(root / "low.safetensors", world["folder"])
    for cmp_, n, shape, _ in MODULES:
        ta, tb, m = world["dora"][cmp_, n]
        u, s, vh = torch.linalg.svd((ALPHA / 4) * tb.double().reshape(shape[0], 4) @ ta.double().reshape(4, -1))
        trunc = (u[:, :2] * s[:2]) @ vh[:2]  # the rank-2 update, plain torch
        v = world["w0"][cmp_, n].double().reshape(shape[0], -1) + trunc
        want = (v * (m.double() / v.norm(dim=1))[:, None]).reshape(shape)
        assert rel(got[cmp_, n], want) < 1e-5
        assert got[cmp_, n].double().reshape(shape[0], -1).norm(dim=1).float() == pytest.approx(m, rel=1e-5)
        assert row(low, n).error == pytest.approx(rel(want, ref_weight(world["w0"][cmp_, n], ta, tb, m)), rel=1e-3)


def test_resize_dynamic_sv_fro_picks_kohyas_ranks(world) -> None:
    root = world["root"]
    report = resize(root / "lora.safetensors", root / "dyn.safetensors", rank=4, dynamic_method="sv_fro",
                    dynamic_param=0.9, overwrite=True)  # fmt: skip
    for c, n, shape, r in MODULES:
        ta, tb, _ = world["lora"][c, n]
        s = torch.linalg.svdvals(tb.double().reshape(shape[0], r) @ ta.double().reshape(r, -1))
        want = min(int((torch.cumsum(s**2, 0) / (s**2).sum() < 0.81).sum()) + 1, r)
        assert row(report, n).rank == want


@pytest.mark.exactness
def test_bake_lora_is_exact_and_dora_error_is_the_svd_tail(world) -> None:
    root = world["root"]
    exact = bake(root / "lora.safetensors", root / "baked_lora.safetensors", rank=4, overwrite=True)
    a, b = load_file(root / "lora.safetensors"), load_file(root / "baked_lora.safetensors")
    assert exact.exact and all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
    out = root / "baked.safetensors"
    report = bake(root / "dora.safetensors", out, rank=3, base=world["base"], threshold=0.2, to="kohya", overwrite=True)
    header = safe_open(out, "pt").metadata()
    assert header["ss_training_comment"].startswith("dora-diffusion bake") and header["ss_network_dim"] == "3"
    assert not any(k.endswith("dora_scale") for k in load_file(out))
    got = file_weights(out, world["folder"])
    dynamic = bake(root / "dora.safetensors", root / "dynamic.safetensors", rank=3, base=world["base"], threshold=0.2,
                   dynamic=True, overwrite=True)  # fmt: skip
    recommended = 1
    for c, n, shape, _ in MODULES:
        ta, tb, m = world["dora"][c, n]
        w0 = world["w0"][c, n].double()
        delta = (ref_weight(w0, ta, tb, m) - w0).reshape(shape[0], -1)
        s = torch.linalg.svdvals(delta)
        tails = [float(s[r:].norm() / s.norm()) for r in range(1, s.numel() + 1)]
        need = next(r for r, t in enumerate(tails, 1) if t <= 0.2)
        recommended = max(recommended, need)
        assert row(dynamic, n).rank == min(need, 3) and row(dynamic, n).change_error == pytest.approx(tails[min(need, 3) - 1], rel=1e-3)
        assert rel(got[c, n] - w0, delta.reshape(shape)) == pytest.approx(tails[2], rel=1e-3)
    assert f"recommended rank for a change error <= 0.2 in every module: {recommended}" in report.notes


def test_merge_loras_stack_exactly_and_a_dora_stacks_exactly_or_is_extracted(world) -> None:
    root = world["root"]
    (root / "lora2").mkdir(exist_ok=True)
    shutil.copy(root / "lora.safetensors", root / "lora2" / "other.safetensors")
    stacked = merge_adapters([root / "lora.safetensors", root / "lora2"], root / "stack.safetensors",
                             strengths=[0.5, -2.0], to="kohya", overwrite=True)  # fmt: skip
    assert stacked.exact and all(r.rank == 8 for r in stacked.rows)
    got = file_weights(root / "stack.safetensors", world["folder"])
    for c, n, _, _ in MODULES:
        ta, tb, _ = world["lora"][c, n]
        assert rel(got[c, n], ref_weight(world["w0"][c, n], ta, tb, None, k=-1.5)) < 1e-6
    # a kohya input (the stacked file, UNet in SGM names of the tiny layout) bakes at its rank exactly
    again = bake(root / "stack.safetensors", root / "stack_baked.safetensors", rank=8, base=world["base"], overwrite=True)
    a, b = load_file(root / "stack.safetensors"), load_file(root / "stack_baked.safetensors")
    assert again.exact and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a DoRA and a LoRA: exactly one DoRA of the stacked ranks (8), no extraction
    mixed = merge_adapters([root / "dora.safetensors", root / "lora.safetensors"], root / "mixed.safetensors",
                           strengths=[1.0, 0.5], base=world["base"], overwrite=True)  # fmt: skip
    assert mixed.exact and all(r.rank == 8 and r.error < 1e-6 for r in mixed.rows)
    got = file_weights(root / "mixed.safetensors", world["folder"])
    wants = {}
    for c, n, _, _ in MODULES:
        w0 = world["w0"][c, n]
        (da, db, dm), (la, lb, _) = world["dora"][c, n], world["lora"][c, n]
        wants[c, n] = ref_weight(w0, da, db, dm) + ref_weight(w0, la, lb, None, k=0.5) - w0.double()
        assert rel(got[c, n], wants[c, n]) < 1e-5
    # at rank 4 the merged weights are extracted, the error printed is the one the file makes
    low = merge_adapters([root / "dora.safetensors", root / "lora.safetensors"], root / "mixed4.safetensors",
                         strengths=[1.0, 0.5], base=world["base"], rank=4, overwrite=True)  # fmt: skip
    assert not low.exact
    got = file_weights(root / "mixed4.safetensors", world["folder"])
    for c, n, _, _ in MODULES:
        r = row(low, n)
        assert r.rank == 4 and r.error > 1e-3 and rel(got[c, n], wants[c, n]) == pytest.approx(r.error, rel=1e-3)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_refusals_and_no_overwrite(world, capsys, tmp_path) -> None:
    root, base = world["root"], world["base"]
    # rank 0
    code, _, err = run(capsys, "bake", root / "lora.safetensors", tmp_path / "x.safetensors", "--rank", "0")
    assert code == 1 and "--rank must be a positive whole number, got 0" in err
    # output onto an input file: refused even with --overwrite, and the file is untouched
    before = (root / "lora.safetensors").read_bytes()
    code, _, err = run(capsys, "resize", root / "lora.safetensors", root / "lora.safetensors", "--rank", "2", "--overwrite")
    assert code == 1 and "is (or is inside, or holds) the input" in err
    assert (root / "lora.safetensors").read_bytes() == before
    # an existing output without --overwrite
    (tmp_path / "taken.safetensors").write_bytes(b"mine")
    code, _, err = run(capsys, "merge", root / "lora.safetensors", "-o", tmp_path / "taken.safetensors")
    assert code == 1 and "already exists; pass --overwrite" in err and (tmp_path / "taken.safetensors").read_bytes() == b"mine"
    code, _, _ = run(capsys, "extract", root / "finetuned", base, tmp_path / "taken.safetensors", "--rank", "2")
    assert code == 1 and (tmp_path / "taken.safetensors").read_bytes() == b"mine"
    # a DoRA without its base
    code, _, err = run(capsys, "bake", root / "dora.safetensors", tmp_path / "y.safetensors", "--rank", "2")
    assert code == 1 and "pass --base" in err
    # missing modules: an adapter module the base does not have
    sd = load_file(root / "lora.safetensors")
    sd = {k.replace("attn1.to_q", "attn1.to_nowhere"): v for k, v in sd.items()}
    save_file(sd, tmp_path / "alien.safetensors")
    with pytest.raises(AdapterFileError, match="match no module of the base model"):
        bake(tmp_path / "alien.safetensors", tmp_path / "z.safetensors", rank=2, base=base)
    # mismatched bases: a folder whose components differ, and adapters that disagree on a module's shape
    other = tmp_path / "other_base"
    shutil.copytree(base, other, ignore=shutil.ignore_patterns("vae", "text_encoder_2", "*.safetensors"))
    index = json.loads((other / "model_index.json").read_text())
    index["text_encoder_2"] = [None, None]
    (other / "model_index.json").write_text(json.dumps(index))
    code, _, err = run(capsys, "extract", root / "finetuned", other, tmp_path / "e.safetensors", "--rank", "2")
    assert code == 1 and "mismatched bases" in err
    sd = load_file(root / "lora.safetensors")
    name = f"unet.{MODULES[0][1]}"
    sd[f"{name}.lora_A.weight"] = torch.zeros(4, 32)
    save_file(sd, tmp_path / "narrow.safetensors")
    with pytest.raises(ValueError, match="mismatched bases"):
        merge_adapters([root / "lora.safetensors", tmp_path / "narrow.safetensors"], tmp_path / "m.safetensors")
    assert not any(p.name in ("x.safetensors", "y.safetensors", "z.safetensors", "e.safetensors", "m.safetensors") for p in tmp_path.iterdir())


def test_cli_extract_prints_errors_and_summary(world, capsys) -> None:
    root = world["root"]
    code, out, _ = run(capsys, "extract", root / "finetuned", world["base"], root / "cli.safetensors", "--rank", "4",
                       "--components", "unet", "--overwrite")  # fmt: skip
    assert code == 0
    lines = out.splitlines()
    rows = [line for line in lines if line[:5].strip().isdigit()]  # the table: rank, errors, module
    assert [row.split()[-1] for row in rows] == [f"unet.{name}" for _, name, _, _ in MODULES[:3]]
    # which module is worst is float noise here (errors of about 3e-7 apart by less than that): any of the three
    assert [line.split()[-1] for line in lines if line.startswith("worst module: ")][0] in {r.split()[-1] for r in rows}
    assert "modules: 3" in lines and any(line.startswith("max error: ") and float(line.split()[-1]) < 1e-4 for line in lines)
    assert lines[-1] == f"wrote {root / 'cli.safetensors'}"


def test_model_folder_reads_an_fp16_variant_and_refuses_a_broken_header(world, tmp_path) -> None:
    variant = tmp_path / "variant"
    shutil.copytree(world["base"], variant, ignore=shutil.ignore_patterns("vae", "text_encoder*", "tokenizer*"))
    (variant / "unet" / "diffusion_pytorch_model.safetensors").rename(variant / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    c, n, _, _ = MODULES[1]
    assert torch.equal(ModelFolder(variant).weight(c, n), load_file(world["base"] / "unet" / "diffusion_pytorch_model.safetensors")[f"{n}.weight"])
    (variant / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="is not a safetensors file"):
        ModelFolder(variant).weight(c, n)


COMMANDS = {  # each command's arguments around an output path OUT; IN is the LoRA file
    "bake": ["bake", "IN", "OUT", "--rank", "R"],
    "resize": ["resize", "IN", "OUT", "--rank", "R"],
    "merge": ["merge", "IN", "IN", "-o", "OUT", "--rank", "R"],
    "extract": ["extract", "FT", "BASE", "OUT", "--rank", "R"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_refuses_rank_0_its_inputs_and_existing_files(world, capsys, tmp_path, command) -> None:
    root = world["root"]
    lora = root / "lora.safetensors"
    swap = {"IN": lora, "FT": root / "finetuned", "BASE": world["base"]}

    def argv(out, rank="2"):
        return [swap.get(a, out if a == "OUT" else rank if a == "R" else a) for a in COMMANDS[command]]

    code, _, err = run(capsys, *argv(tmp_path / "a.safetensors", rank="0"))
    assert code == 1 and "--rank must be a positive whole number, got 0" in err
    onto = lora if command != "extract" else world["base"] / "unet" / "x.safetensors"  # extract: inside an input folder
    before = lora.read_bytes()
    code, _, err = run(capsys, *argv(onto), "--overwrite")
    assert code == 1 and "is (or is inside, or holds) the input" in err and lora.read_bytes() == before
    (tmp_path / "taken.safetensors").write_bytes(b"mine")
    code, _, err = run(capsys, *argv(tmp_path / "taken.safetensors"))
    assert code == 1 and "already exists; pass --overwrite" in err and (tmp_path / "taken.safetensors").read_bytes() == b"mine"
    assert not (world["base"] / "unet" / "x.safetensors").exists() and not (tmp_path / "a.safetensors").exists()


def test_other_lycoris_kinds_are_refused_by_name() -> None:
    """The toolbox's factors are B A: a LoKr module (the loader reads it) is refused, naming its kind."""
    from dora_diffusion.formats.base import ModuleAdapter
    from dora_diffusion.formats.safefile import AdapterFileError
    from dora_diffusion.tools.weights import check_low_rank

    lokr = ModuleAdapter(None, None, None, 1.0, kind="lokr", factors={"w1": torch.ones(2, 2), "w2": torch.ones(4, 4)}, ndim=2)
    with pytest.raises(AdapterFileError, match="unet.x is a lokr module; the toolbox reads low-rank"):
        check_low_rank("unet.x", lokr)
    check_low_rank("unet.y", ModuleAdapter(torch.ones(2, 4), torch.ones(3, 2), None, 2.0))  # low-rank passes


def test_the_toolbox_commands_return_freed_memory_to_the_system(monkeypatch, tmp_path):
    """glibc's mallopt is set to a fixed 128 KiB mmap and trim threshold before extract/resize/merge/bake run (their
    peak resident memory extracting from the full SDXL UNet fell from 4.5 GiB to 1.5 GiB: docs/tools.md); not where glibc is absent,
    and not for the other commands."""
    import ctypes

    from dora_diffusion import cli
    from dora_diffusion.tools import weights

    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc())
    assert weights.return_freed_memory() is True and calls == [(-3, 131072), (-1, 131072)]

    def missing(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", missing)
    assert weights.return_freed_memory() is False

    seen = []
    monkeypatch.setattr(weights, "return_freed_memory", lambda: seen.append(True) or True)
    assert cli.main(["extract", str(tmp_path / "no-ft"), str(tmp_path / "no-base"), str(tmp_path / "o.safetensors"), "--rank", "2"]) == 1
    assert seen == [True]
    assert cli.main(["inspect", str(tmp_path / "nothing.safetensors")]) == 1
    assert seen == [True]
