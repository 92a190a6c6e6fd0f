"""Each install compiles DeepSpeed's ops into a folder of its own (models.train.common): one venv
reached by two paths used to rebuild the same op folder back and forth, 65-110 s a launch."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch

from models.train.common import extension_build_root, use_own_extension_builds

MAIN = "/work/main/.venv/lib/python3.11/site-packages/deepspeed/__init__.py"
LINKED = "/work/wt-x/.venv/lib/python3.11/site-packages/deepspeed/__init__.py"  # the same venv through a symlink


def test_two_paths_to_one_install_build_in_two_folders_and_each_keeps_its_own():
    main, linked = extension_build_root("/ext", MAIN), extension_build_root("/ext", LINKED)
    assert main != linked
    assert Path(main).parent == Path(linked).parent == Path("/ext")
    assert extension_build_root("/ext", MAIN) == main  # the same install finds its build again
    assert extension_build_root(main, MAIN) == main  # a process that inherited the folder does not nest it


def test_a_rank_sets_the_folder_from_its_deepspeed_and_torch(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    path = use_own_extension_builds()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == path and Path(path).parent == tmp_path
    assert use_own_extension_builds() == path  # a second setup in one process: the same folder
    spec = importlib.util.find_spec("deepspeed")
    assert spec is not None and spec.origin
    install = "|".join([spec.origin, torch.__file__, torch.__version__, str(torch.version.cuda), sys.version])
    assert path == extension_build_root(str(tmp_path), install)

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")  # unset: under torch's own default root
    from torch.utils.cpp_extension import get_default_build_root

    assert Path(use_own_extension_builds()).parent == Path(get_default_build_root())
