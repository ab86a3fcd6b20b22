"""What the README and docs/ claim about the code is what the code does: the recipe table against the
configs, the task list against the registry, every link against the files."""
import os
import re
from dataclasses import asdict

import tasks
from settings import flatten
from train import Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(path):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def test_recipe_table_matches_the_configs():
    """Every value docs/reproducing.md's recipe table claims for a config is the value that config sets."""
    lines = read("docs/reproducing.md").split("<!-- recipe table -->")[1].strip().splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    names = head[1:4]
    cfgs = {n: Config.from_argv(["--config", os.path.join(ROOT, "configs", f"{n}.json"), "--model=micro"]) for n in names}
    rows = 0
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        key = cells[0].strip("`")
        for name, claimed in zip(names, cells[1:4]):
            actual = flatten(asdict(cfgs[name]))[key]
            assert str(actual).lower() == claimed.lower(), (key, name, actual, claimed)
        rows += 1
    assert rows >= 15


def test_readme_lists_the_registered_tasks():
    sentence = read("README.md").split("Tasks (`tasks.TASKS`")[1].split("and from files")[0]
    listed = re.findall(r"`(\w+)`", sentence.split("):", 1)[1])
    assert listed == list(tasks.TASKS)


def test_readme_stays_short():
    assert len(read("README.md").splitlines()) <= 250


def test_links_point_at_files():
    for doc in ["README.md", "results/tiny.md", "results/multihop.md"] + [
            os.path.join("docs", f) for f in sorted(os.listdir(os.path.join(ROOT, "docs")))]:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", read(doc)):
            if not target.startswith("http"):
                assert os.path.exists(os.path.join(ROOT, os.path.dirname(doc), target)), (doc, target)
