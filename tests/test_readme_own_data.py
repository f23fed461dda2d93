"""The README's "Your own data" commands, run as written on a tiny COCO dataset."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

from conftest import REPO, write_synthetic_coco

MARKER = "<!-- own-data commands:"


def readme_commands():
    text = open(os.path.join(REPO, "README.md")).read()
    block = re.search(r"```bash\n(.*?)```", text[text.index(MARKER):], re.S).group(1)
    block = block.replace("\\\n", " ")
    return [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_readme_own_data_commands_check_train_and_evaluate(tmp_path):
    data = tmp_path / "my_data"
    write_synthetic_coco(str(data), num_images=4)
    shutil.copy(data / "train.json", data / "val.json")
    commands = readme_commands()
    assert [c.split()[1] for c in commands] == ["tools/check_dataset.py"] * 2 + ["train_net.py"]
    for command in commands:
        argv = shlex.split(command.replace("my_data/", f"{data}/").replace("output/my_run", str(tmp_path / "run")))
        assert argv[0] == ".venv/bin/python"
        argv[0] = sys.executable
        if argv[1] == "train_net.py":  # the same command, trained for a few iterations only
            argv += ["train.max_iter=2", "model.transformer.num_decoder_layers=1"]
        done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        if argv[1] == "tools/check_dataset.py":
            assert done.stdout.startswith("OK ") and "4 images, 8 annotations, 1 categories" in done.stdout
    results = json.load(open(tmp_path / "run" / "eval_results.json"))
    assert set(results) == {"bbox", "segm"}
    assert os.path.isfile(tmp_path / "run" / "model_final.pth")
