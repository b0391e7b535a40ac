"""Export: ONNX Runtime, torch.export and TorchScript outputs equal the eager eval outputs.

Every dynamic layer gets strongly randomized generator weights so that different inputs choose
different permutations; a graph that had folded the permutation of the tracing input into a
constant would then disagree with the eager model.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from checkpoints import checkpoint_of
from dyshuffle.deploy.export import (
    FORMATS,
    export_model,
    export_program,
    load_exported,
    main,
    run_exported,
    save_exported_program,
    save_onnx,
    save_torchscript,
)
from dyshuffle.layers import DynamicShuffle, LearnedShuffle, list_mixers
from dyshuffle.layers.permutation import permutation_table
from dyshuffle.models import create_model
from layer_calls import dynamic_layer_calls

DEPLOY_DOC = Path(__file__).resolve().parents[1] / "docs" / "DEPLOY.md"
INPUT = (3, 32, 32)
TOL = 1e-4  # max abs difference, fp32
CONFIGS = sorted(  # the slowest exports first, so that two test workers finish together
    [
        *[("shufflenet_v1_g3_x0_5", mixer, "conv") for mixer in list_mixers()],
        *[("shufflenet_v2_x0_5", mixer, "conv") for mixer in list_mixers()],
        ("mobilenet_v2", "shuffle", "sds"),
    ],
    key=lambda c: (c[2] != "sds", c[1] not in ("dynamic", "static_dynamic"), c),
)
DYNAMIC_MIXERS = ("dynamic", "static_dynamic")


def is_dynamic(name: str, mixer: str, pointwise: str) -> bool:
    """Whether the model has input-dependent permutations."""
    return mixer in DYNAMIC_MIXERS or pointwise == "sds"


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random logits that make the permutations input-dependent, far from the identity init.

    One training-mode forward on a random batch calibrates, layer by layer: BatchNorm running
    statistics (so activations keep unit scale at every depth in eval) and each dynamic layer's
    generator, whose hidden pre-activations are centered and scaled to unit spread over the
    batch, so the direction of the hidden vector, and with it the argmax of the random last
    layer, changes from input to input.
    """
    gen = torch.Generator().manual_seed(seed)

    def calibrate(layer: DynamicShuffle, args: tuple[torch.Tensor, ...], kwargs: dict) -> None:
        first, last = layer.generator[0], layer.generator[-1]
        # (N, C) descriptors; the parts of a concatenation come as several inputs, the tensor
        # that a layer with context_channels reads as its context
        read = (kwargs["context"],) if "context" in kwargs else args
        z = torch.cat([a.mean(dim=(2, 3)) for a in read], dim=1)
        pre = (z - z.mean(0)) @ first.weight.T  # centered pre-activations
        first.weight.div_(pre.std(0, keepdim=True).T + 1e-6)
        first.bias.copy_(-(z.mean(0) @ first.weight.T))
        last.weight.copy_(torch.randn(last.weight.shape, generator=gen) * 2 / layer.hidden**0.5)
        # a random bias, not zero: an input whose hidden units are all inactive (possible with
        # the narrow default generator) then gets a definite permutation, not a tie of all
        last.bias.copy_(torch.randn(last.bias.shape, generator=gen))

    hooks, norms = [], []
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LearnedShuffle):
                m.logit_param.copy_(torch.randn(m.logit_param.shape, generator=gen) * 3)
            elif isinstance(m, DynamicShuffle):
                hooks.append(m.register_forward_pre_hook(calibrate, with_kwargs=True))
            elif isinstance(m, torch.nn.BatchNorm2d):  # running stats := this batch's
                m.reset_running_stats()
                m.momentum = None
                norms.append(m)
        # training-mode BatchNorm keeps activations at unit scale at every depth
        model.train()(inputs(16, seed + 100))
    for h in hooks:
        h.remove()
    for m in norms:
        m.momentum = 0.1
    return model.eval()


def build(
    name: str, mixer: str, pointwise: str, seed: int = 0, descriptor: str = "mixer_input"
) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {} if descriptor == "mixer_input" else {"mixer_descriptor": descriptor}
    model = create_model(
        name, num_classes=10, stem="cifar", mixer=mixer, pointwise=pointwise, **kwargs
    )
    return randomize(model, seed).eval()


def inputs(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, *INPUT, generator=torch.Generator().manual_seed(seed))


def choices(model: torch.nn.Module, x: torch.Tensor) -> tuple[list[int], float]:
    """Per input-dependent layer, the number of distinct permutations the batch chooses; and the
    smallest score gap between the best and second-best permutation of a factor (a near-tie
    could flip between runtimes and would make the comparison meaningless)."""
    counts: list[int] = []
    gaps: list[float] = [math.inf]

    def hook(layer: DynamicShuffle, args: tuple[torch.Tensor, ...], kwargs: dict) -> None:
        counts.append(len(set(map(tuple, layer.permutation(*args, **kwargs).tolist()))))
        for m in layer.factor_matrices(*args, **kwargs):
            a = m.shape[-1]
            if 1 < a <= 6:  # exact assignment: scores of all a! permutations
                scores = m.flatten(-2) @ permutation_table(a)[1].T
                top = scores.topk(2, dim=-1).values
                gaps.append((top[..., 0] - top[..., 1]).min().item())

    hooks = [
        m.register_forward_pre_hook(hook, with_kwargs=True)
        for m in model.modules()
        if isinstance(m, DynamicShuffle) and not isinstance(m, LearnedShuffle)
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return counts, min(gaps)


def eager(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


#: the configuration whose files are also loaded in a fresh process (SDS with a dynamic part)
FRESH = ("shufflenet_v2_x0_5", "static_dynamic", "conv")


@pytest.mark.parametrize(
    ("name", "mixer", "pointwise", "descriptor"),
    [  # the ONNX conversion of the models with dynamic layers takes 10-40 s each on a CPU core
        pytest.param(
            *c, "mixer_input", id="-".join(c), marks=[pytest.mark.slow] if is_dynamic(*c) else []
        )
        for c in CONFIGS
    ]
    + [  # generators that read their unit's input (a second input of each layer)
        pytest.param(
            "shufflenet_v2_x0_5", "dynamic", "conv", "unit_input", marks=[pytest.mark.slow]
        )
    ],
)
def test_exported_outputs_equal_eager(name, mixer, pointwise, descriptor, tmp_path):
    xs = [inputs(1, 1), inputs(3, 2)]  # two batch sizes, neither the tracing batch (2)
    dynamic = is_dynamic(name, mixer, pointwise)
    for seed in range(5):  # the first random logits without a near-tie on the test inputs
        model = build(name, mixer, pointwise, seed, descriptor)
        if not dynamic or min(choices(model, x)[1] for x in xs) > 1e-5:
            break
    if dynamic:  # the test inputs choose different permutations in most dynamic layers
        counts, gap = choices(model, xs[1])
        assert counts and sum(c > 1 for c in counts) >= len(counts) / 2, counts
        assert min(gap, choices(model, xs[0])[1]) > 1e-5
    refs = [eager(model, x) for x in xs]

    program = export_program(model, INPUT)
    paths = {
        "onnx": save_onnx(program, tmp_path / "m.onnx"),
        "torchscript": save_torchscript(model, tmp_path / "m.ts", INPUT),
    }
    runs = {fmt: load_exported(path, fmt) for fmt, path in paths.items()}
    runs["torch.export"] = program.module()
    for x, ref in zip(xs, refs):
        for fmt, run in runs.items():  # as a user calls them: autograd on (parameters need grad)
            assert (run(x).detach() - ref).abs().max() <= TOL, (fmt, x.shape[0])

    graph = onnx.load(str(paths["onnx"])).graph
    blobs = [(i.dims, i.raw_data) for i in graph.initializer if i.raw_data]
    assert len({(tuple(d), r) for d, r in blobs}) == len(blobs)  # constants stored once
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    ops = {n.op_type for n in graph.node}
    if dynamic:  # generator, binarization and gather are graph operations
        assert {"ReduceMean", "Softmax", "MatMul", "ArgMax"} <= ops, ops
        assert ops & {"Gather", "GatherElements", "GatherND"}, ops
        aten = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
        assert any("argmax" in t for t in aten) and any("index" in t for t in aten), aten
    elif mixer == "learned":  # an input-independent permutation may fold into a constant index
        assert ops & {"Gather", "GatherElements", "GatherND"}, ops

    if (name, mixer, pointwise) == FRESH:
        paths["exported-program"] = save_exported_program(program, tmp_path / "m.pt2")
        check_in_fresh_process(paths, xs[1], refs[1], tmp_path)


def check_in_fresh_process(paths, x, ref, tmp_path) -> None:
    """The files run with torch / ONNX Runtime alone, ``dyshuffle`` made unimportable."""
    np.save(tmp_path / "x.npy", x.numpy())
    code = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["dyshuffle"] = None  # importing dyshuffle now fails
        import numpy as np, onnxruntime as ort, torch
        x = np.load({str(tmp_path / "x.npy")!r})
        out = {{}}
        s = ort.InferenceSession({str(paths["onnx"])!r}, providers=["CPUExecutionProvider"])
        out["onnx"] = s.run(["logits"], {{"input": x}})[0].tolist()
        ep = torch.export.load({str(paths["exported-program"])!r}).module()
        out["exported-program"] = ep(torch.from_numpy(x)).detach().tolist()
        ts = torch.jit.load({str(paths["torchscript"])!r})
        out["torchscript"] = ts(torch.from_numpy(x)).detach().tolist()
        print(json.dumps(out))
        """
    )
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(out) == set(FORMATS)
    for fmt, values in out.items():
        assert (torch.tensor(values) - ref).abs().max() <= TOL, fmt


def _checkpoint(tmp_path, name="shufflenet_v2_x0_5", mixer="dynamic", pointwise="conv"):
    model = build(name, mixer, pointwise)
    classes = [f"class{i}" for i in range(10)]
    return checkpoint_of(model, tmp_path / "run" / "last.pt", class_names=classes, epoch=3), model


def test_cli_export_onnx_with_metadata_and_the_doc_snippet(tmp_path, capsys, monkeypatch):
    ckpt, model = _checkpoint(tmp_path, "shufflenet_v1_g3_x0_5", "none")
    assert main([str(ckpt), "--format", "onnx", "--opset", "18"]) == 0
    out = ckpt.with_suffix(".onnx")  # default: next to the checkpoint
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "check: max |exported - eager|" in printed
    worst = float(printed.split("max |exported - eager| = ")[1].split()[0])
    assert worst <= TOL
    proto = onnx.load(str(out))
    assert any(o.domain in ("", "ai.onnx") and o.version == 18 for o in proto.opset_import)
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["dyshuffle"])
    assert meta["class_names"] == [f"class{i}" for i in range(10)]
    assert meta["input_size"] == list(INPUT) and meta["mean"] == [0.5, 0.5, 0.5]
    x = inputs(2, 9)
    assert (run_exported(out, "onnx", x) - eager(model, x)).abs().max() <= TOL

    # the ```python block of docs/DEPLOY.md runs next to the exported last.onnx
    (snippet,) = re.findall(r"```python\n(.*?)```", DEPLOY_DOC.read_text(), flags=re.S)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    image.save(out.parent / "image.png")
    monkeypatch.chdir(out.parent)
    capsys.readouterr()
    exec(compile(snippet, "docs/DEPLOY.md[python]", "exec"), {})
    x = torch.from_numpy(np.asarray(image.resize((32, 32)), dtype=np.float32)) / 255
    expected = eager(model, ((x - 0.5) / 0.25).permute(2, 0, 1)[None]).argmax().item()
    assert capsys.readouterr().out.strip() == f"class{expected}"


def test_cli_export_torchscript_to_output(tmp_path, capsys):
    ckpt, model = _checkpoint(tmp_path)
    target = tmp_path / "deploy" / "model.ts"
    assert main([str(ckpt.parent), "--format", "torchscript", "--output", str(target)]) == 0
    files = {"dyshuffle.json": ""}
    loaded = torch.jit.load(str(target), _extra_files=files)
    assert json.loads(files["dyshuffle.json"])["model_args"]["mixer"] == "dynamic"
    x = inputs(4, 11)
    with torch.no_grad():
        assert (loaded(x) - eager(model, x)).abs().max() <= TOL


def test_cli_export_of_nearest_permutations_asks_for_another_assignment(tmp_path, capsys):
    """A model with ``assignment="optimal"`` on 8 x 8 factors cannot be exported: the command says
    so and names ``--assignment greedy``; with it the file is the greedy-binarized network (the
    same as eager with ``"greedy"``), and its metadata says so."""
    torch.manual_seed(0)
    model = create_model("shufflenet_v2_x0_5", num_classes=10, stem="cifar", mixer="dynamic",
                         max_group_size=64, assignment="optimal", init="random")  # fmt: skip
    ckpt = checkpoint_of(model, tmp_path / "run" / "last.pt")
    target = tmp_path / "model.ts"
    assert main([str(ckpt), "--format", "torchscript", "--output", str(target)]) == 2
    err = capsys.readouterr().err
    assert "assignment 'optimal'" in err and "--assignment greedy" in err
    assert "wider than 6 x 6" in err and not target.exists()
    argv = [str(ckpt), "--format", "torchscript", "--output", str(target), "--assignment", "greedy"]
    assert main(argv) == 0
    files = {"dyshuffle.json": ""}
    loaded = torch.jit.load(str(target), _extra_files=files)
    assert json.loads(files["dyshuffle.json"])["model_args"]["assignment"] == "greedy"
    greedy = create_model(**{**model.model_args, "assignment": "greedy"})
    greedy.load_state_dict(model.state_dict())
    x = inputs(8, 3)
    with torch.no_grad():
        exported = loaded(x)
    assert (exported - eager(greedy.eval(), x)).abs().max() <= TOL
    # the greedy choice is not the nearest permutation for some of these inputs: the option
    # changed the permutations the exported network applies
    nearest = dict(model.named_modules())
    assert any(
        not torch.equal(m.permutation(*a, **k), nearest[n].permutation(*a, **k))
        for n, (m, a, k) in dynamic_layer_calls(greedy, x).items()
    )
    # a model without dynamic layers has nothing to binarize: said so, not "not loadable"
    plain, _ = _checkpoint(tmp_path / "plain", mixer="shuffle")
    assert main([str(plain), "--format", "torchscript", "--assignment", "greedy"]) == 2
    err = capsys.readouterr().err
    assert "has no dynamic-shuffle layers (mixer 'shuffle'" in err and "loadable" not in err


def test_bad_input_names_value_and_choices(tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    assert main([str(missing), "--format", "onnx"]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "does not exist" in err
    with pytest.raises(SystemExit) as exc:
        main([str(missing), "--format", "tflite"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "'tflite'" in err and all(f in err for f in FORMATS)
    with pytest.raises(ValueError, match="unknown export format 'tflite'; valid: onnx, "):
        export_model(torch.nn.Linear(2, 2), tmp_path / "x", "tflite", (2,))
    not_a_checkpoint = tmp_path / "junk.pt"
    torch.save({"weights": 1}, not_a_checkpoint)
    assert main([str(not_a_checkpoint), "--format", "onnx"]) == 2
    assert "not a loadable dyshuffle checkpoint" in capsys.readouterr().err


def test_an_opset_the_exporter_cannot_reach_and_a_folder_output_are_errors(tmp_path, capsys):
    ckpt, _ = _checkpoint(tmp_path, "shufflenet_v2_x0_5", "shuffle")
    out = tmp_path / "m13.onnx"
    assert main([str(ckpt), "--format", "onnx", "--opset", "13", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "opset 13" in err and re.search(r"produced opset \d+", err) and not out.exists()
    assert main([str(ckpt), "--format", "onnx", "--output", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_cli_export_keeps_the_onnx_converters_chatter_off_the_terminal(
    tmp_path, capfd, monkeypatch
):
    """The converter logs its opset down-conversion attempts (a torch warning, onnxscript
    messages and a traceback); the terminal (file descriptors 1 and 2) gets the command's own
    lines only. When the converter raises, its messages come with the error."""
    import logging

    ckpt, _ = _checkpoint(tmp_path, "shufflenet_v2_x0_5", "shuffle")
    loggers = ("torch.onnx", "onnxscript", "onnx_ir")
    before = [(logging.getLogger(n).handlers[:], logging.getLogger(n).propagate) for n in loggers]
    out = tmp_path / "m17.onnx"
    assert main([str(ckpt), "--format", "onnx", "--opset", "17", "--output", str(out)]) == 2
    printed = capfd.readouterr()
    assert printed.out == "" and re.fullmatch(
        r"dyshuffle export: the ONNX exporter could not convert the model to opset 17 \(it "
        r"produced opset (\d+)\); use --opset \1 or above, or leave --opset out\n",
        printed.err,
    )
    after = [(logging.getLogger(n).handlers, logging.getLogger(n).propagate) for n in loggers]
    assert after == before

    def failing_export(*args, **kwargs):
        logging.getLogger("onnxscript.optimizer").warning("a hint before the failure")
        raise RuntimeError("the converter failed")

    monkeypatch.setattr(torch.onnx, "export", failing_export)
    with pytest.raises(RuntimeError, match="the converter failed"):
        main([str(ckpt), "--format", "onnx", "--output", str(out)])
    assert capfd.readouterr().err == "onnxscript.optimizer: a hint before the failure\n"
    assert not out.exists()


@pytest.mark.parametrize("fmt", ["torchscript", "exported-program"])
def test_exported_files_leave_the_joint_index_tables_out(fmt, tmp_path, monkeypatch):
    """The layers' joint index tables (2 MiB per 464-channel layer) are not written; the eager
    model keeps them (its fast path)."""
    import contextlib

    import dyshuffle.deploy.export as export_module

    model = create_model("shufflenet_v2_x1_0", num_classes=10, stem="cifar", mixer="dynamic")
    layers = [m for m in model.modules() if isinstance(m, DynamicShuffle)]
    joint = [m._index_ab for m in layers]
    joint_bytes = sum(t.numel() * t.element_size() for t in joint if t is not None)
    compact = export_model(model.eval(), tmp_path / "compact.bin", fmt, INPUT)
    assert all(m._index_ab is t for m, t in zip(layers, joint))
    monkeypatch.setattr(export_module, "compact_index", contextlib.nullcontext)
    full = export_model(model, tmp_path / "full.bin", fmt, INPUT)
    saved = full.stat().st_size - compact.stat().st_size
    assert joint_bytes > 8e6 and saved > 0.9 * joint_bytes, (saved, joint_bytes)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_a_model_exported_in_grad_mode_runs_in_grad_mode(channels_last):
    """`torch.export.export(model.eval(), ...)` without no_grad, the module called without it
    (as a user would): the traced layers' gather is an op autograd can record."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    model = create_model("shufflenet_v2_x0_5", num_classes=10, stem="cifar", mixer="dynamic")
    model = model.eval().to(memory_format=fmt)
    x = torch.randn(2, *INPUT).to(memory_format=fmt)
    ref = model(x)
    assert ref.requires_grad  # the layers ran their autograd Function
    module = torch.export.export(model, (x,)).module()
    assert torch.equal(module(x), ref)
