"""A generator's class names: what to show, and names (case-insensitive, with close-match hints) or ids -> ids.

A model's own names come with it (the bundle's Fashion-MNIST names, a training run's folder names); a 1000-class
model also answers to torchvision's ImageNet names, and shows them when its own names are WordNet ids (n01440764).
"""

from __future__ import annotations

import difflib

from tokenizer.common.errors import UserError

__all__ = ["imagenet_class_names", "class_display_names", "resolve_class_ids", "class_choices"]


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class names (torchvision's table; no download)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


def class_display_names(class_names: list, num_classes: int) -> list[str]:
    """The names to show for class ids 0.. : words where the model's own names are WordNet ids."""
    if num_classes == 1000 and all(n.startswith("n") and n[1:].isdigit() for n in class_names):
        return imagenet_class_names()
    return [str(n) for n in class_names]


def name_table(class_names: list, num_classes: int) -> dict:
    """lower-case name -> id: the model's own class names, plus torchvision's ImageNet names for 1000 classes."""
    table = {}
    if num_classes == 1000:
        table.update({n.lower(): i for i, n in enumerate(imagenet_class_names())})
    table.update({str(n).lower(): i for i, n in enumerate(class_names)})
    return table


def resolve_class_ids(specs, class_names: list, num_classes: int) -> list[int]:
    """Ids (int or digit strings) or names (case-insensitive) -> class ids; a UserError lists the choices."""
    if isinstance(specs, (str, int)):
        specs = [specs]
    table, ids = None, []
    for spec in specs:
        is_int = isinstance(spec, int) and not isinstance(spec, bool)
        text = None if is_int else str(spec).strip()
        digits = text if text is not None and not text.startswith("-") else (text or "")[1:]
        if is_int or (digits.isascii() and digits.isdigit()):  # ASCII digits only: "١" or "²" is a name
            if text is not None and len(digits) > 12:  # no int() of a 5,000-digit string; surely out of range
                raise UserError(f"class {text[:12]}... is outside this model's classes 0..{num_classes - 1}")
            cid = int(spec) if text is None else int(text)
            if not 0 <= cid < num_classes:
                raise UserError(f"class {cid} is outside this model's classes 0..{num_classes - 1} "
                                f"({class_choices(class_names, num_classes)})")
            ids.append(cid)
            continue
        table = table if table is not None else name_table(class_names, num_classes)  # built once, when needed
        cid = table.get(text.lower())
        if cid is None:
            close = difflib.get_close_matches(text.lower(), list(table), n=3, cutoff=0.6) if len(text) <= 100 else []
            hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
            shown = text if len(text) <= 40 else text[:40] + "..."  # never echo a long input back whole
            raise UserError(f"unknown class name {shown!r}; {hint}valid names: "
                            f"{class_choices(class_names, num_classes)}")
        ids.append(cid)
    if not ids:
        raise UserError(f"no class given; valid: {class_choices(class_names, num_classes)}")
    return ids


def class_choices(class_names: list, num_classes: int, limit: int = 10) -> str:
    """'ids 0..N-1 or names: 0 'a', 1 'b', ... (N classes in all)': the valid choices, for error messages."""
    names = class_display_names(class_names, num_classes)
    shown = ", ".join(f"{i} {names[i]!r}" for i in range(min(limit, len(names))))
    more = f", ... ({len(names)} classes in all)" if len(names) > limit else f" ({len(names)} classes)"
    return f"ids 0..{num_classes - 1} or names: {shown}{more}"
