"""The plumbing both scripts need is written once and copied byte for byte into each."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
START = "# Appendix: plumbing shared by rnn_covid.py and vae_anime.py"
END = "# End of shared plumbing"


def shared_block(script):
    text = (ROOT / script).read_text(encoding="utf-8")
    assert text.count(START) == 1 and text.count(END) == 1, f"{script}: shared-plumbing markers"
    return text[text.index(START):text.index(END)]


def test_shared_plumbing_is_identical_in_both_scripts():
    rnn, vae = shared_block("rnn_covid.py"), shared_block("vae_anime.py")
    assert rnn == vae
    # The block holds what both scripts need; neither keeps a private copy elsewhere.
    for name in ("atomic_path", "write_text_atomically", "save_figure_atomically", "check_writable",
                 "choose_device", "seed_everything", "setup_logging", "exit_code", "UserError"):
        assert re.search(rf"^(def|class) {name}\b", rnn, re.M), name
        for script in ("rnn_covid.py", "vae_anime.py"):
            text = (ROOT / script).read_text(encoding="utf-8")
            assert len(re.findall(rf"^(def|class) {name}\b", text, re.M)) == 1, (script, name)


def test_data_step_uses_the_same_atomic_write():
    sys.path.insert(0, str(ROOT / "data"))
    import prepare_data
    import rnn_covid
    import inspect
    assert inspect.getsource(prepare_data.atomic_path) == inspect.getsource(rnn_covid.atomic_path)


@pytest.mark.parametrize("script", ["rnn_covid.py", "vae_anime.py"])
def test_import_sets_no_environment_or_backend(script):
    """Importing a script (as the tests do) changes no matplotlib backend and no environment
    variable, except OMP_WAIT_POLICY: libgomp reads it once when torch loads, so it can only be
    set before `import torch` (both scripts say why beside the line)."""
    code = ("import os, sys, matplotlib; env = dict(os.environ); "
            f"sys.path.insert(0, {str(ROOT)!r}); import {script[:-3]}; "
            "env.setdefault('OMP_WAIT_POLICY', 'PASSIVE'); "
            "assert dict(os.environ) == env, set(os.environ.items()) ^ set(env.items()); "
            "assert matplotlib.get_backend().lower() == 'svg', matplotlib.get_backend()")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT,
                   env={"PATH": "/usr/bin:/bin", "MPLBACKEND": "svg"})
