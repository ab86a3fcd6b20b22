# No module or package of the project may share its import name with an installed distribution's.
# The repository root is first on sys.path for every script and test run from it (and bench/ is on it
# for a bench script), so `import kernels` inside transformers would find a folder of ours called
# kernels/. This check is what catches the next clash the day a dependency brings one in.
import importlib.metadata
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def our_import_names(root):
    """{import name: path} of every module and package a script run from `root` (or bench/) can import."""
    names = {}
    for folder in (root, os.path.join(root, "bench")):
        for entry in sorted(os.listdir(folder)):
            path = os.path.join(folder, entry)
            if entry.endswith(".py"):
                names[entry[:-3]] = os.path.relpath(path, root)
            elif os.path.isfile(os.path.join(path, "__init__.py")):
                names[entry] = os.path.relpath(path, root)
    return names


def clashes(root):
    installed = importlib.metadata.packages_distributions()
    return [f"{path} has the import name '{name}' of the installed distribution(s) {sorted(set(installed[name]))}"
            for name, path in sorted(our_import_names(root).items()) if name in installed]


def test_no_project_name_shadows_an_installed_package():
    found = clashes(ROOT)
    assert not found, "rename them:\n" + "\n".join(found)


def test_a_clash_added_at_the_root_is_caught():
    installed = importlib.metadata.packages_distributions()
    name = next(n for n in sorted(installed) if n.isidentifier() and n not in our_import_names(ROOT)
                and not os.path.exists(os.path.join(ROOT, n)))
    probe = os.path.join(ROOT, name + ".py")
    with open(probe, "w") as f:
        f.write("# a temporary module named like an installed package\n")
    try:
        found = clashes(ROOT)
    finally:
        os.remove(probe)
    assert len(found) == 1 and f"{name}.py" in found[0] and f"'{name}'" in found[0]
    assert all(dist in found[0] for dist in installed[name])


def test_project_names_are_listed():  # the walk sees what a script can import
    names = our_import_names(ROOT)
    assert {"model", "rollout", "paged_attention", "train", "eval", "attention"} <= set(names)
    assert "tests" not in names and "configs" not in names  # folders without __init__.py import nothing
