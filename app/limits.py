"""What one request may ask of the app, checked on the server before it enters the queue.

Every input is checked here (the page's sliders are a convenience: the API takes any JSON). A bad input raises an
`InputError`: a one-line UserError that names the input (so the page can show it at that input) and its valid range,
and that echoes at most `ECHO` characters of what was sent.

The sampling ranges are the ones every entry point shares (tokenizer.common.validation.SAMPLING_LIMITS); on top of
them the app caps the work of one request: classes x images per class x DiT steps <= `max_cost` (default
`DEFAULT_MAX_COST` = 8 x 8 x 50, the largest request at the embedded model's default steps).
"""

import re

from tokenizer.common.errors import UserError
from tokenizer.common.validation import SAMPLING_LIMITS, real_number, whole_number

# What one request may ask for (the sliders show the same ranges).
LIMITS = {"classes": 8, "num": 8, "seed": SAMPLING_LIMITS["seed"][1], "cfg_scale": SAMPLING_LIMITS["cfg_scale"],
          "steps": SAMPLING_LIMITS["steps"][1], "decoder_steps": SAMPLING_LIMITS["decoder_steps"][1]}
DEFAULT_MAX_COST = LIMITS["classes"] * LIMITS["num"] * 50  # image-steps per request: 3,200
ECHO = 40  # characters of a client's text that an error message repeats
MAX_NAME = 100  # a class name longer than any model's (ImageNet's longest is 30 characters)
# The inputs of the two endpoints, in order (the page's components and the API's parameters).
GENERATE_INPUTS = ("classes", "num", "seed", "cfg_scale", "steps", "sampler", "decoder", "decoder_steps")
COMPARE_INPUTS = GENERATE_INPUTS[:6]


class InputError(UserError):
    """A bad request value: `field` names the input it belongs to (one of GENERATE_INPUTS)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def echo(value, limit: int = ECHO) -> str:
    """A client's value as an error message repeats it: repr'd, cut to `limit` characters (a list or dict is named
    by its type and length: its items are the client's, not ours to repeat)."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int) and abs(value) >= 10 ** limit:  # str() of a huge int is slow, and refused past 4,300
        return f"a {value.bit_length():,}-bit number"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (list, tuple, dict)):
        return f"a {type(value).__name__} of {len(value)}"
    if not isinstance(value, str):
        return type(value).__name__
    text = repr(value)
    return f"{text[:limit]}... ({len(value):,} characters)" if len(text) > limit else text


def check(field: str, read, what: str, value, lo, hi):
    """`read(what, value, lo, hi)` (whole_number / real_number) with its error tied to `field` and cut short."""
    huge = isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**18
    try:  # a huge int is checked as the nearest out-of-range one: printing it is slow, and refused past 4,300 digits
        return read(what, (hi + 1 if value > 0 else lo - 1) if huge else value, lo, hi)
    except UserError as e:
        message = str(e)
        if "got" in message:  # the shared checkers echo the whole value: echo it short instead
            message = message.rsplit("got", 1)[0] + f"got {echo(value)}"
        raise InputError(field, message) from None


def class_ids(gen, classes) -> list[int]:
    """Class ids of a request's classes (ids or names, one or a list) -> list of ints in 0..num_classes-1.

    Ids are ints or strings of ASCII digits; anything else is a name, looked up by the generator. Strings that
    only look like numbers ("--5", "²", "١", a 5,000-digit number) are refused here as input errors, before the
    generator's own parsing sees them."""
    if isinstance(classes, (str, int)) and not isinstance(classes, bool):
        classes = [classes]
    if not isinstance(classes, (list, tuple)) or any(isinstance(c, bool) or not isinstance(c, (str, int))
                                                     for c in classes):
        raise InputError("classes", f"classes must be a list of names or ids, got {echo(classes)}")
    if not 1 <= len(classes) <= LIMITS["classes"]:
        raise InputError("classes", f"choose 1 to {LIMITS['classes']} classes (names or ids), got {len(classes)}")
    n = gen.num_classes
    ids = []
    for spec in classes:
        text = spec.strip() if isinstance(spec, str) else None
        if text is not None and re.fullmatch(r"-?[0-9]+", text):
            if len(text) > 12:
                raise InputError("classes", f"class {echo(text)} is outside this model's classes 0..{n - 1}")
            spec = int(text)
        if isinstance(spec, int):
            if not 0 <= spec < n:
                raise InputError("classes", f"class {echo(spec)} is outside this model's classes 0..{n - 1}")
            ids.append(spec)
            continue
        if not text:
            raise InputError("classes", f"a class is empty: give an id 0..{n - 1} or a name")
        if text.lstrip("+-").isnumeric():  # "--5", "+5", "²", "١": numbers to Python, no id to this app
            raise InputError("classes", f"class {echo(text)} is neither an id 0..{n - 1} (ASCII digits) nor a name")
        if len(text) > MAX_NAME:
            raise InputError("classes", f"class name {echo(text)} is too long (at most {MAX_NAME} characters)")
        try:
            ids += gen.resolve_classes([text])
        except UserError as e:  # unknown name: the generator's message lists the choices
            raise InputError("classes", str(e)) from None
    return ids


def request_cost(images: int, steps: int) -> int:
    """The work of a request in image-steps: images (classes x images per class) x DiT steps."""
    return images * steps


def validate(gen, classes, num, seed, cfg_scale, steps, sampler, decoder=None, decoder_steps=None,
             max_cost: int | None = None) -> dict:
    """The inputs of one request, checked on the server -> keyword arguments of `Generator.generate` (with
    `decoder`) or `Generator.compare` (without). Classes are ids or names. A bad input raises an InputError that
    names the input and its valid range; a request over `max_cost` image-steps is refused."""
    ids = class_ids(gen, classes)
    args = {"class_ids": ids,
            "num": check("num", whole_number, "the number of images per class", num, 1, LIMITS["num"]),
            "seed": check("seed", whole_number, "the seed", seed, 0, LIMITS["seed"]),
            "cfg_scale": check("cfg_scale", real_number, "the CFG scale", cfg_scale, *LIMITS["cfg_scale"]),
            "steps": check("steps", whole_number, "the DiT steps", steps, 1, LIMITS["steps"])}
    if not isinstance(sampler, str):
        raise InputError("sampler", f"the sampler must be a name, got {echo(sampler)}")
    try:
        gen.sampler_settings(args["cfg_scale"], args["steps"], sampler[:ECHO])  # the sampler of the model's family
    except UserError as e:
        raise InputError("sampler", str(e)) from None
    args["sampler"] = sampler
    if decoder is not None or decoder_steps is not None:
        if not isinstance(decoder, str) or decoder not in gen.decoders:
            raise InputError("decoder", f"unknown decoder {echo(decoder)}; this generator offers: "
                                        f"{', '.join(gen.decoder_names)}")
        args["decoder"] = decoder
        args["decoder_steps"] = check("decoder_steps", whole_number, "the decoder steps", decoder_steps, 1,
                                      LIMITS["decoder_steps"])
    cost = request_cost(len(ids) * args["num"], args["steps"])
    if max_cost is not None and cost > max_cost:
        raise InputError("steps", f"this request asks for {len(ids)} classes x {args['num']} images x "
                                  f"{args['steps']} steps = {cost:,} image-steps; this app takes at most "
                                  f"{max_cost:,} per request (fewer images or steps)")
    return args
