"""YAML as sptok reads it (manifests, training and mix configs): PyYAML's safe loader, with a budget on aliases.

Aliases (``*name``) are the one way a small YAML file becomes a huge value: 600 bytes of nested anchors
expand to billions of values, which the loader shares but every later step (the schema check, a message, a
copy) walks in full. So the node graph is measured before anything is built from it, and a document whose
aliases add more than ``ALIAS_BUDGET`` values (scalar characters included) to what the file itself holds is
refused, as is an alias inside its own anchor. A key given twice in one mapping is refused too.
"""

from __future__ import annotations

from .errors import SptokError

ALIAS_BUDGET = 100_000


def load_yaml(text: str, what: str):
    """The document in ``text`` (None when empty); ``what`` names the file in every error ("manifest m.yaml")."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)   # libyaml's parser: 30x faster on a big file
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_aliases(node, what)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise SptokError(f"{what}{where}: invalid YAML: {problem}") from None
    except RecursionError:
        raise SptokError(f"{what}: invalid YAML: nested too deeply to read") from None
    finally:
        loader.dispose()


def _check_aliases(root, what: str) -> None:
    """Refuse a node graph whose expansion exceeds its own size by more than ALIAS_BUDGET, or that is cyclic."""
    import yaml

    sizes: dict[int, int] = {}      # id(node) -> size with every alias expanded
    own = 0                         # size of the distinct nodes: what the file itself holds
    on_path: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        children = ([c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode)
                    else node.value if isinstance(node, yaml.SequenceNode) else [])
        weight = 1 + (len(node.value) if isinstance(node, yaml.ScalarNode) else 0)
        if done:
            on_path.discard(id(node))
            sizes[id(node)] = weight + sum(sizes[id(c)] for c in children)
            own += weight
            if sizes[id(node)] - own > ALIAS_BUDGET:
                line = node.start_mark.line + 1
                raise SptokError(f"{what}: the YAML aliases (*name) up to line {line} expand to more than "
                                 f"{ALIAS_BUDGET:,} values beyond what the file holds; write the values out or "
                                 f"use fewer aliases")
            continue
        if id(node) in sizes:
            continue
        if isinstance(node, yaml.MappingNode):
            _check_keys(node, what)
        on_path.add(id(node))
        stack.append((node, True))
        for c in children:
            if id(c) in on_path:
                raise SptokError(f"{what} line {c.start_mark.line + 1}: a YAML alias refers to its own anchor "
                                 f"(the value would be infinite)")
            if id(c) not in sizes:
                stack.append((c, False))


def _check_keys(node, what: str) -> None:
    """Refuse a key given twice in one mapping: YAML keeps the last value silently (a second `weight:` or
    `paths:` of a source would win without a word). A merge (``<<: *a``) overriding its values is not that."""
    seen: dict = {}
    for key, _ in node.value:
        if getattr(key, "tag", "").endswith(":merge") or not isinstance(key.value, str):
            continue
        if key.value in seen:
            raise SptokError(f"{what} line {key.start_mark.line + 1}: the key {key.value!r} is given twice in one "
                             f"mapping (first on line {seen[key.value]}); YAML would keep the last silently: "
                             f"remove one")
        seen[key.value] = key.start_mark.line + 1
