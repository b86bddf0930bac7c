"""
The scripts' plumbing (common.py): options, --help, devices, one-line errors for bad settings; and
the project's import layers.
"""
import ast, glob, os, re

import pytest
import torch

import common
from conftest import HERE, run, script_knobs

def test_a_string_option_takes_the_text_as_given():
    g = {"start": "x", "n_layer": 2, "compile": False}
    given = common.configure(g, ["--start=2024", "--n_layer=3", "--compile=True"])
    assert given == {"start", "n_layer", "compile"}
    assert g == {"start": "2024", "n_layer": 3, "compile": True}
    common.configure(g, ["--start='quoted' [1, 2]"])
    assert g["start"] == "'quoted' [1, 2]"

def test_a_device_the_machine_does_not_have_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert common.get_device("") == "cuda"
    assert common.get_device("cuda:0") == "cuda:0"
    with pytest.raises(SystemExit):
        common.get_device("cuda:5")
    err = capsys.readouterr().err
    assert err == "error: --device=cuda:5, but this machine has 1 cuda device: use an index below 1, " \
                  "or leave it empty\n"

@pytest.mark.parametrize("script", ["embed.py", "train.py", "sample.py", "eval.py", "bench.py"])
def test_help_lists_every_knob_with_its_default(script, tmp_path):
    for flag in ("--help", "-h"):
        p = run(script, flag, "--n_layer=oops", cwd=tmp_path)
        assert p.stdout.startswith(open(os.path.join(HERE, script)).read().split('"""')[1].strip())
        knobs = script_knobs(script)
        assert len(knobs) >= 6
        for name, value in knobs.items():
            assert f"  --{name}={value if value != '' else repr(value)}" in p.stdout, name
    # the comment beside a knob, and one continued on the next line
    p = run("embed.py", "--help", cwd=tmp_path)
    assert "--max_docs=0                       0 = all documents" in p.stdout
    assert "a hub dataset's name" in p.stdout

@pytest.mark.parametrize("script, typo, knob", [("train.py", "max_iter", "max_iters"),
                                                ("sample.py", "num_sample", "num_samples"),
                                                ("embed.py", "datset", "dataset")])
def test_a_misspelt_option_names_the_knob_meant(script, typo, knob, tmp_path):
    p = run(script, f"--{typo}=5", cwd=tmp_path, check=False)
    assert p.returncode == 1 and p.stderr.strip().endswith(f"did you mean --{knob}?"), p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr

@pytest.mark.parametrize("args, message", [
    (["--n_layerz=3"], "unknown option 'n_layerz'"),
    (["--n_layer=three"], "--n_layer wants a int"),
    (["--batch_size=0"], "--batch_size=0 must be at least 1"),
    (["--last_step_share=1.5"], "--last_step_share=1.5 must be in [0, 1]"),
    (["--ema=1"], "--ema=1.0 must be in [0, 1)"),
    (["--n_embd=30", "--n_head=4"], "must be a multiple of --n_head"),
    (["--dataset=nope"], "no dataset at"),
    (["config/nope.py"], "config file config/nope.py not found"),
    (["--device=gpu"], "--device=gpu is not a device"),
    (["--device=cuda"], "--device=cuda, but this machine has no cuda"),
    (["--out_dir={tmp}/afile/o"], "cannot write to --out_dir"),
    (["--mi_model=gpt2"], "unknown option 'mi_model'"),
    (["--init_from=resume", "--out_dir={tmp}/truncated"], "is not a readable baselcm checkpoint"),
    (["--eval_only=True", "--out_dir={tmp}/empty"], "is not a readable baselcm checkpoint"),
])
def test_bad_configuration_gives_one_clear_line(args, message, tmp_path):
    (tmp_path / "afile").write_text("")
    for name, content in (("truncated", b"PK\x03\x04 cut short"), ("empty", b"")):
        os.makedirs(tmp_path / name)
        (tmp_path / name / "ckpt.pt").write_bytes(content)
    p = run("train.py", f"--out_dir={tmp_path}/o", *[a.format(tmp=tmp_path) for a in args],
            cwd=HERE, check=False)
    assert p.returncode == 1 and message in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr

# the project's modules, floor first; a module imports only from the layers below its own
LAYERS = [["baselcm", "generation", "metrics"], ["common", "diffusion"], ["datafiles", "quant"],
          ["checkpoints", "concepts"], ["embed", "train", "sample", "eval", "bench"],
          ["scripts/aclsum_data", "scripts/corpora", "scripts/gpu_check", "scripts/plot",
           "scripts/quant_roundtrip"]]

def test_every_import_points_down_a_layer_and_none_makes_a_circle():
    layer = {name.split("/")[-1]: i for i, names in enumerate(LAYERS) for name in names}
    found = sorted(os.path.relpath(f, HERE)[:-3] for f in glob.glob(os.path.join(HERE, "*.py"))
                   + glob.glob(os.path.join(HERE, "scripts", "*.py")))
    # every module has its layer (tests and their conftest aside)
    assert [f for f in found if not f.startswith(("test_", "conftest"))] == sorted(sum(LAYERS, []))
    for name, i in layer.items():
        path = os.path.join(HERE, "scripts" if i == len(LAYERS) - 1 else "", f"{name}.py")
        # function-local imports too: a circle hidden in a function is still a circle
        for node in ast.walk(ast.parse(open(path).read())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            for imported in (n.split(".")[0] for n in names):
                assert layer.get(imported, -1) < i, f"{name} imports {imported}"

def test_the_readmes_file_table_gives_each_files_true_line_count():
    table = re.findall(r"^\| `(\w+\.py)` \| (\d+) \|", open(os.path.join(HERE, "README.md")).read(), re.M)
    assert len(table) == 6
    for name, lines in table:
        assert int(lines) == len(open(os.path.join(HERE, name)).readlines()), name
