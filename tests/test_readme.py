"""README.md as a user's contract: its Python snippet and its commands (and the Makefile's) run as
written. The snippet is compared with dense PyTorch on the masked weights; each command is parsed by
the CLI it names (the study with --print-config, which reads no data; a sweep with --dry-run)."""
import copy
import os
import re
import shlex
import unicodedata

import torch

from sparsetrain.testing import zero_pruned_

import cli_forks

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
README = open(os.path.join(ROOT, "README.md")).read()


def _blocks(lang: str) -> list[str]:
    return re.findall(r"^```" + lang + r"\n(.*?)^```", README, flags=re.S | re.M)


def test_engine_in_five_lines_trains_as_the_dense_masked_model(monkeypatch):
    """"The engine in five lines" runs as printed, and its one SGD step through the sparse layers gives
    the weights a dense model with the same masks gets (pruned weights and their gradients zero)."""
    code = README[README.index("## The engine in five lines"):]
    code = re.search(r"^```python\n(.*?)^```", code, flags=re.S | re.M).group(1)
    import sparsetrain.prune
    seen = {}
    prune = sparsetrain.prune.global_prune

    def recording(model, *args, **kw):  # (the model as built, and the RNG state its input is drawn from)
        seen.update(model=copy.deepcopy(model), rng=torch.get_rng_state())
        return prune(model, *args, **kw)
    monkeypatch.setattr(sparsetrain.prune, "global_prune", recording)
    torch.manual_seed(0)
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)

    model, masks, ref = ns["model"], ns["masks"], seen["model"]
    before = {name: m.weight.detach().clone() for name, m in ref.named_modules() if name in masks}
    assert masks and all(m.dtype == torch.bool for m in masks.values())
    torch.set_rng_state(seen["rng"])
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    layers = dict(ref.named_modules())
    zero_pruned_(ref, masks)
    opt = torch.optim.SGD(ref.parameters(), **ns["opt"].defaults)
    loss = torch.nn.functional.cross_entropy(ref(x), y)
    loss.backward()
    for name, mask in masks.items():
        layers[name].weight.grad.mul_(mask)
    opt.step()
    assert torch.allclose(ns["loss"], loss, rtol=1e-5, atol=1e-6)
    got = dict(model.named_modules())
    for name, mask in masks.items():
        assert type(got[name]) is torch.nn.Linear, name  # densify_ gave the nn.Linear back
        assert torch.equal(got[name].weight[~mask], torch.zeros_like(got[name].weight[~mask]))
        assert torch.allclose(got[name].weight, layers[name].weight, rtol=1e-5, atol=1e-6), name
        assert not torch.equal(got[name].weight, before[name] * mask), name  # (the step trained it)
        assert torch.allclose(got[name].bias, layers[name].bias, rtol=1e-5, atol=1e-6), name


def _commands():
    """(module, argv) of every `python -m sparsetrain.*` line in README's bash blocks and every
    `$(PY) -m sparsetrain.*` line of the Makefile (comments dropped)."""
    lines = [ln for block in _blocks("bash") for ln in block.splitlines()]
    lines += [ln.replace("$(PY)", "python") for ln in open(os.path.join(ROOT, "Makefile")).read().splitlines()]
    out = []
    for ln in lines:
        if not ln.strip().startswith("python -m sparsetrain."):
            continue
        words = shlex.split(ln.strip(), comments=True)
        if "--help" not in words and (words[2], words[3:]) not in out:
            out.append((words[2], words[3:]))
    return out


def test_readme_and_makefile_commands_parse(tmp_path):
    commands = _commands()
    modules = {m for m, _ in commands}
    assert modules == {"sparsetrain.experiment", "sparsetrain.sweep"} and len(commands) >= 10, commands
    out = str(tmp_path / "out")
    for module in sorted(modules):
        cases = [argv for m, argv in commands if m == module]
        if module == "sparsetrain.experiment":
            runs = [argv + ([] if "--print-config" in argv else ["--print-config"]) + ["--out", out] for argv in cases]
        else:  # (report: no runs in an empty folder, after its arguments parsed)
            runs = [argv + ["--out", out] + ([] if argv[0] == "report" else ["--dry-run"]) for argv in cases]
        results = cli_forks.run(module, [(tmp_path, argv) for argv in runs],
                                preload=["sparsetrain.experiment.study" if module.endswith("experiment")
                                         else "sparsetrain.sweep.cli"])
        for argv, r in zip(runs, results):
            if argv[0] == "report":
                assert r.returncode == 2 and "no run directory" in r.stderr, (argv, r.stderr)
            else:  # (a GPU command too, on a machine without that GPU: --print-config shows it since 2026-12-08)
                assert r.returncode == 0 and "usage:" not in r.stderr, (argv, r.stderr[-2000:])


def test_layout_lists_the_public_api():
    """The Layout's `__init__.py` line names exactly the lazy public API `import sparsetrain` offers
    (dense_state_dict was missing from it)."""
    import sparsetrain
    layout = README[README.index("## Layout"):]
    listed = re.search(r"__init__\.py\s+the public API \(lazy\): (.*?); nn\.py re-exports", layout, re.S).group(1)
    names = {n.strip() for n in listed.split(",")}
    assert names == set(sparsetrain._LAZY), (names ^ set(sparsetrain._LAZY))
    for name in names:
        assert getattr(sparsetrain, name) is not None, name


def _anchors(text: str) -> list[str]:
    """GitHub's anchor of each heading outside code blocks: lowercased, every character but letters,
    marks, digits, '_', '-' and ' ' dropped, spaces to '-', a repeated one suffixed -1, -2, ..."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    out, seen = [], {}
    for h in re.findall(r"^#{1,6} +(.+?)\s*$", text, flags=re.M):
        a = "".join(c for c in h.lower() if c in "-_ " or unicodedata.category(c)[:1] in "LM"
                    or unicodedata.category(c) == "Nd").replace(" ", "-")
        n = seen.get(a, 0)
        seen[a] = n + 1
        out.append(a if n == 0 else f"{a}-{n}")
    return out


def test_contents_links_every_section_and_every_anchor_resolves():
    """README is ~2700 lines: its Contents links every `##` section in order, and every `](#...)` link,
    here or into docs/*.md, names a heading that exists (a renamed heading left links dead)."""
    sections = re.findall(r"^## +(.+?)\s*$", re.sub(r"^```.*?^```", "", README, flags=re.S | re.M), flags=re.M)
    contents = README[README.index("\nContents:\n"):README.index("\n## ")]
    linked = re.findall(r"^- \[.*?\]\(#(.*?)\)$", contents, flags=re.M)
    assert linked == _anchors("".join(f"## {s}\n" for s in sections)), (linked, sections)
    links = re.findall(r"\]\(([\w./-]*?)#([^)\s]+)\)", README)
    assert len(links) >= len(sections) + 10  # (the docs/measurements.md links too)
    for path, anchor in links:
        text = README if not path else open(os.path.join(ROOT, path)).read()
        assert anchor in _anchors(text), f"README links {path}#{anchor}, which has no such heading"
    docs = os.path.join(ROOT, "docs")
    for name in sorted(f for f in os.listdir(docs) if f.endswith(".md")):  # (and the docs' links back into README)
        for anchor in re.findall(r"\]\((?:\.\./)?README\.md#([^)\s]+)\)", open(os.path.join(docs, name)).read()):
            assert anchor in _anchors(README), f"docs/{name} links README.md#{anchor}, which has no such heading"


def test_no_section_runs_on_for_hundreds_of_lines_without_a_heading():
    """The long sections are split into `###` subsections where their topic changes: the engine's ran
    ~490 lines under one heading, the study's ~690 and Benchmarks' ~530, and a reader could not find things."""
    lines = re.sub(r"^```.*?^```", lambda m: "\n" * m.group(0).count("\n"), README, flags=re.S | re.M).split("\n")
    starts = [i for i, ln in enumerate(lines) if re.match(r"#{1,6} ", ln)] + [len(lines)]
    longest = max((b - a, lines[a]) for a, b in zip(starts, starts[1:]))
    assert len(starts) > 20 and longest[0] <= 200, longest


def test_a_section_named_in_the_text_is_a_link_to_it():
    """Where the text sends the reader to a section by its title ("(Not built yet / known limits: the
    resumed-run item)", "**Vector width** below"), the title is a link to that heading."""
    text = re.sub(r"^```.*?^```", "", README, flags=re.S | re.M)
    titles = [t for t in re.findall(r"^#{2,3} +([^`\n]+?)\s*$", text, flags=re.M) if len(t) >= 10]
    assert len(titles) > 20
    for t in titles:
        for bare in (f"({t}:", f"**{t}** above", f"**{t}** below", f'"{t}"'):  # (a bullet's bold lead is no reference)
            assert bare not in text, f"README names the section {t!r} as {bare!r} without linking it"


def test_the_recipes_table_says_which_role_the_quick_depth_width_epochs_set():
    """The quick paper-depth-width row gives 8 epochs per round: the recipe sets the students' alone, and the
    teacher trains on the quick schedule's epochs (the row read as if every run trained 8)."""
    from sparsetrain.experiment.presets import schedule
    from sparsetrain.sweep.recipes import recipe
    row = next(l for l in README.splitlines() if l.startswith("| `paper-depth-width` |")).split(" | ")[3]
    quick = recipe("paper-depth-width", "quick")
    assert quick["student_epochs"] == [8] and not {"epochs", "teacher_epochs"} & set(quick)
    teacher = schedule("quick", quick["dataset"][0], quick["model"][0])["epochs"]
    assert "8 epochs per round for the students" in row and f"the quick schedule's {teacher})" in row
