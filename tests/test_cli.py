"""The command line's help: every method listed, and printing it costs no torch import."""
import subprocess
import sys

from hashindex.catalogue import METHOD_SUMMARIES
from hashindex.methods import METHODS


def test_catalogue_lists_exactly_the_registered_methods():
    assert set(METHOD_SUMMARIES) == set(METHODS)


def test_train_help_lists_every_method_without_importing_torch():
    script = ("import sys\nfrom hashindex.cli import main\n"
              "try:\n    main(['train', '--help'])\nexcept SystemExit:\n    pass\n"
              "print('IMPORTED', [m for m in ('torch', 'dask', 'numba') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert "IMPORTED []" in out
    help_lines = out.split("methods (--method):")[1].splitlines()
    for name, (supervision, _) in METHOD_SUMMARIES.items():
        line = next((line for line in help_lines if line.strip().startswith(name + " ")), None)
        assert line is not None, f"{name} is not listed in train --help"
        assert f"[{supervision}]" in line


def test_unknown_method_is_refused_with_the_list():
    out = subprocess.run([sys.executable, "-m", "hashindex.cli", "train", "--method", "pq", "--source", "digits",
                          "--out", "x.enc"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "invalid choice: 'pq'" in out.stderr and "itq" in out.stderr


def test_train_takes_feature_blocks(tmp_path):
    """``--feature-blocks`` puts the blocks in the encoder's backbone (any method); a malformed list is
    refused before anything runs."""
    from hashindex.cli import main
    from hashindex.encoder import Encoder
    out = tmp_path / "itq.encoder"
    main(["train", "--method", "itq", "--bits", "16", "--source", "digits", "--sample", "300",
          "--feature-blocks", "10,12", "--cache-dir", str(tmp_path), "--out", str(out)])
    assert Encoder.load(str(out)).backbone_spec.blocks == (10, 12)
    bad = subprocess.run([sys.executable, "-m", "hashindex.cli", "train", "--method", "itq", "--source", "digits",
                          "--feature-blocks", "ten", "--out", str(tmp_path / "x.enc")], capture_output=True, text=True)
    assert bad.returncode == 2 and "expected block numbers like 10,12,14 or 'head', got 'ten'" in bad.stderr
