"""The plumbing both scripts need is written once and copied byte for byte into each."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
START = "# ==== Appendix: plumbing shared by rnn_covid.py and vae_anime.py"
END = "# ==== End of shared plumbing"


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


def environment_after(code):
    """os.environ and the matplotlib backend after running `code` in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", f"import json, os, sys, matplotlib; {code}; "
                          "print(json.dumps([dict(os.environ), matplotlib.get_backend()]))"],
                         check=True, cwd=ROOT, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "MPLBACKEND": "svg"})
    return json.loads(out.stdout.splitlines()[-1])


# Records OMP_WAIT_POLICY at the moment `import torch` starts: libgomp reads it only then.
OMP_AT_TORCH_IMPORT = """
class Spy:
    seen = []
    def find_spec(self, name, path=None, target=None):
        if name == "torch": Spy.seen.append(os.environ.get("OMP_WAIT_POLICY"))
sys.meta_path.insert(0, Spy())"""


@pytest.mark.parametrize("script", ["rnn_covid.py", "vae_anime.py"])
def test_import_changes_only_what_its_libraries_change(script):
    """Importing a script (as the tests do) keeps the matplotlib backend and sets no variable of
    its own but OMP_WAIT_POLICY, already set when torch starts to load; what torch and
    torchvision set themselves on import (e.g. TORCHINDUCTOR_CACHE_DIR) is theirs."""
    libraries, _ = environment_after("import torch, torchvision")
    env, backend = environment_after(f"{OMP_AT_TORCH_IMPORT}; sys.path.insert(0, {str(ROOT)!r}); "
                                     f"import {script[:-3]}, torch, torchvision; "
                                     "os.environ['SEEN'] = str(Spy.seen)")
    assert backend.lower() == "svg"
    assert env.pop("SEEN") == "['PASSIVE']"
    assert env == libraries | {"OMP_WAIT_POLICY": "PASSIVE"}
