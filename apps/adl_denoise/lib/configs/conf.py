"""The app's conf keys (``--conf key value`` of ``monailabel start_server``), checked when the app is built.

MONAI Label hands the app every ``--conf`` pair as a string and never checks them; read where they are used, a
wrong value failed late (``device gpu``: a 422 on every request, as if the client had asked for it), fell back
silently (``modality xray``: values guessed; ``max_voxels 0``: every image refused as too large) or stopped the
start-up with a message that did not name the key (``could not convert string to float: 'abc'``).
:func:`check_conf` checks them all before anything is built and raises :class:`ConfError` naming the key, the
value and what is allowed; a key that looks like a misspelling of one of them (``max_voxel``, ``modle_dir``) is an
error too (it would be ignored, e.g. a size limit that silently stays at its default), any other key the app does
not read is a warning in the log. The readers (:class:`lib.configs.base.DenoiserTaskConfig`) use the same parsers.
"""
from __future__ import annotations

import difflib
import logging
import math
import os
from typing import Mapping

from ..runtime.switches import TRUE_WORDS, parse_bool

logger = logging.getLogger(__name__)

#: every key this app reads, with what it takes (for the messages)
CONF_KEYS: dict[str, str] = {
    "models": "all, adl, adl_3d, tddl_gcn, nlm or a comma list of them",
    "model_dir": "an existing folder of weights",
    "device": "auto, cpu, cuda or cuda:N",
    "preload": "true or false",
    "modality": "auto, ct or mr",
    "result_extension": ".nii.gz, .nii, .nrrd, .mha or dicom",
    "train_steps": "a whole number >= 1",
    "normal_dose": "normal-dose CT images: files or folders, comma-separated",
    "max_voxels": "a whole number of voxels >= 1, e.g. 1e9",
    # one model's own limit, over max_voxels: the 3D network holds the whole volume on its device, the 2D / 2.5D
    # ones a batch of slices (README.md, "max_voxels_<model>")
    **{f"max_voxels_{model}": f"a whole number of voxels >= 1, e.g. 2e8 ({model}'s own limit, over max_voxels)"
       for model in ("adl", "adl_3d", "tddl_gcn", "nlm")},
    "max_concurrent_infers": "a whole number >= 1",
    "audit_dir": "a folder (made if missing)",
}
#: keys MONAI Label itself reads from the same conf
MONAI_LABEL_KEYS = frozenset({"server_mode"})


class ConfError(ValueError):
    """A ``--conf`` value the app cannot run with; the message names the key."""


def _fail(key: str, value: object, problem: str) -> ConfError:
    return ConfError(f"--conf {key} {value!r}: {problem} (expected {CONF_KEYS[key]})")


def conf_int(conf: Mapping[str, str], key: str, default: int, minimum: int = 1) -> int:
    """``conf[key]`` as a whole number >= ``minimum`` (``1e9`` and ``1000000000`` alike); ``default`` when unset
    or empty. :class:`ConfError` naming the key otherwise."""
    value = conf.get(key)
    if value is None or str(value).strip() == "":
        return default
    try:
        number = float(str(value).strip())
    except ValueError:
        raise _fail(key, value, "not a number") from None
    if not math.isfinite(number) or number != int(number):
        raise _fail(key, value, "not a whole number")
    if number < minimum:
        raise _fail(key, value, f"below {minimum}")
    return int(number)


def conf_voxels(conf: Mapping[str, str], key: str = "max_voxels") -> int | None:
    """``conf[key]`` as a voxel limit, parsed as ``ADL_MAX_VOXELS`` is (:func:`lib.imaging.guards.parse_voxel_limit`:
    one parser, one message); None when unset or empty. :class:`ConfError` naming the key otherwise."""
    from ..imaging.guards import parse_voxel_limit

    value = conf.get(key)
    if value is None or str(value).strip() == "":
        return None
    try:
        return parse_voxel_limit(value, f"--conf {key}")
    except ValueError as error:
        raise ConfError(str(error)) from None


def model_voxel_setting(conf: Mapping[str, str], model: str) -> str:
    """The conf key that sets ``model``'s voxel limit: ``max_voxels_<model>`` where the conf gives it, else
    ``max_voxels``."""
    key = f"max_voxels_{model}"
    return key if str(conf.get(key) or "").strip() else "max_voxels"


def model_voxel_limit(conf: Mapping[str, str], model: str) -> int | None:
    """``model``'s voxel limit: ``max_voxels_<model>``, else ``max_voxels`` (:func:`conf_voxels`); None when neither
    is set (then :func:`lib.imaging.max_voxels`, ``ADL_MAX_VOXELS``)."""
    return conf_voxels(conf, model_voxel_setting(conf, model))


def conf_bool(conf: Mapping[str, str], key: str, default: bool) -> bool:
    """``conf[key]`` as a boolean (:func:`lib.runtime.switches.parse_bool`: y, yes, t, true, on, 1 / n, no, f,
    false, off, 0); ``default`` when unset or empty. :class:`ConfError` naming the key and the words otherwise."""
    value = conf.get(key)
    if value is None or str(value).strip() == "":
        return default
    try:
        return parse_bool(value, f"--conf {key}")
    except ValueError as error:
        raise ConfError(str(error)) from None


def model_names(conf: Mapping[str, str], available: Mapping[str, object]) -> list[str]:
    """The ``models`` list (``all`` when unset); :class:`ConfError` for a name that is no model."""
    names = [m.strip() for m in (conf.get("models") or "all").split(",") if m.strip()]
    unknown = [m for m in names if m != "all" and m not in available]
    if unknown:
        raise ConfError(f"--conf models {conf.get('models')!r}: unknown model(s) {unknown}; available: all, "
                        f"{', '.join(available)}")
    return names or ["all"]


def check_conf(conf: Mapping[str, str], available: Mapping[str, object]) -> None:
    """Check every key of ``conf`` (see the module docstring); :class:`ConfError` at the first wrong one, a
    warning in the log for keys the app does not read."""
    from ..infers.denoise import RESULT_EXTENSIONS
    from ..predict import check_device_name

    for key in conf:
        if key in CONF_KEYS or key in MONAI_LABEL_KEYS:
            continue
        word = str(key).strip().lower().replace("-", "_")
        near = [word] if word in CONF_KEYS else difflib.get_close_matches(word, CONF_KEYS, n=1, cutoff=0.7)
        if near:
            raise ConfError(f"--conf {key}: not a conf key of this app, did you mean {near[0]}? (it would be "
                            f"ignored; keys: {', '.join(CONF_KEYS)})")
        logger.warning("--conf %s is not read by this app (ignored; its keys: %s)", key, ", ".join(CONF_KEYS))
    model_names(conf, available)
    for key in ("model_dir", "audit_dir"):
        value = conf.get(key)
        if value is not None and not str(value).strip():
            raise _fail(key, value, "empty")
    model_dir = conf.get("model_dir")
    if model_dir:
        path = os.path.expanduser(model_dir)
        if not os.path.exists(path):
            raise _fail("model_dir", model_dir, "no such folder")
        if not os.path.isdir(path):
            raise _fail("model_dir", model_dir, "not a folder")
    audit_dir = conf.get("audit_dir")
    if audit_dir:
        path = os.path.abspath(os.path.expanduser(audit_dir))
        if os.path.exists(path) and not os.path.isdir(path):
            raise _fail("audit_dir", audit_dir, "not a folder")
        parent = os.path.dirname(path)
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise _fail("audit_dir", audit_dir, f"{parent} is not a folder")
    if "device" in conf:
        try:
            check_device_name(conf["device"], present=True)
        except ValueError as error:
            raise ConfError(f"--conf device {conf['device']!r}: {error}") from None
    conf_bool(conf, "preload", False)
    modality = conf.get("modality")
    if modality is not None and str(modality).strip().lower() not in ("auto", "ct", "mr"):
        raise _fail("modality", modality, "not a modality these models denoise")
    extension = conf.get("result_extension")
    if extension is not None and extension not in RESULT_EXTENSIONS:
        raise _fail("result_extension", extension, "not a result format")
    conf_int(conf, "train_steps", 200)
    for key in CONF_KEYS:
        if key == "max_voxels" or key.startswith("max_voxels_"):
            conf_voxels(conf, key)
    conf_int(conf, "max_concurrent_infers", 2)
    normal_dose = conf.get("normal_dose")
    if normal_dose is not None:
        items = [item.strip() for item in str(normal_dose).split(",") if item.strip()]
        if not items:
            raise _fail("normal_dose", normal_dose, "empty")
        missing = [item for item in items if not os.path.exists(os.path.expanduser(item))]
        if missing:
            raise _fail("normal_dose", normal_dose, f"no such file or folder: {', '.join(missing)}")


#: environment variables MONAI Label reads that are not fields of its settings
MONAI_LABEL_OTHER_ENV = frozenset({"MONAI_LABEL_RELOAD_APP_LIB"})


def check_environment(environ: Mapping[str, str], settings: object) -> None:
    """The ``MONAI_LABEL_*`` environment of the server: MONAI Label's settings take only exact, case-sensitive names
    and ignore every other, so ``MONAI_LABEL_AUTH_ENABLED=true`` or ``monai_label_auth_enable=true`` left a
    department server open without a word. A name that is no setting is a warning naming the setting it resembles;
    :class:`ConfError` when it resembles ``MONAI_LABEL_AUTH_ENABLE`` while authentication is off (the server would
    start open), and when authentication is on without a realm URL to check tokens against."""
    fields = set(type(settings).model_fields) if hasattr(type(settings), "model_fields") else set()
    for name, value in environ.items():
        if not name.upper().startswith("MONAI_LABEL_") or name in fields or name in MONAI_LABEL_OTHER_ENV:
            continue
        near = [field for field in fields if field == name.upper()] or \
            difflib.get_close_matches(name.upper(), fields, n=1, cutoff=0.85)
        # TRUE_WORDS: the words MONAI Label's settings (pydantic) read as true, too
        if near and near[0] == "MONAI_LABEL_AUTH_ENABLE" and not getattr(settings, near[0], False) and \
                str(value).strip().lower() in TRUE_WORDS:
            raise ConfError(f"environment variable {name}={value!r} is not a MONAI Label setting (names are exact and "
                            f"case-sensitive): did you mean {near[0]}? The server would start without "
                            "authentication")
        logger.warning("environment variable %s is not a MONAI Label setting (ignored)%s", name,
                       f"; did you mean {near[0]}?" if near else "")
    if getattr(settings, "MONAI_LABEL_AUTH_ENABLE", False):
        realm = str(getattr(settings, "MONAI_LABEL_AUTH_REALM_URI", "") or "").strip()
        if not realm.lower().startswith(("http://", "https://")):
            raise ConfError(f"MONAI_LABEL_AUTH_ENABLE is on but MONAI_LABEL_AUTH_REALM_URI {realm!r} is no http(s) "
                            "URL of the realm: no token could be checked")


def unwritable(folder: str | os.PathLike) -> str | None:
    """Why the server cannot write into ``folder`` (or, when it does not exist yet, make it: the nearest folder
    above it is asked), or None when it can. Asked by making and removing a file there, the one test that root, a
    read-only mount and an immutable folder (``chattr +i``) all answer truly (``os.access`` says yes to root)."""
    import tempfile

    path = os.path.abspath(os.path.expanduser(os.fspath(folder)))
    probe = path
    while not os.path.lexists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"{probe} is not a folder" if probe != path else "not a folder"
    where = "" if probe == path else f" (it does not exist yet, and {probe} above it)"
    try:
        fd, name = tempfile.mkstemp(prefix=".write-check-", dir=probe)
    except OSError as error:
        return f"cannot write there{where}: {error.strerror or type(error).__name__}"
    try:
        os.close(fd)
    except OSError:  # the removal below says whether the folder is usable
        pass
    try:
        os.unlink(name)
    except OSError as error:
        # an append-only folder (chattr +a) takes new files but refuses to remove or replace them, which the
        # server does there (atomic replacements, removed studies and scratch files); the probe cannot be removed
        # either: named, so that it is not left unexplained
        return (f"files can be made there{where} but not removed or replaced ({error.strerror or type(error).__name__}"
                f"; an append-only folder?), which the server does there; remove the probe file "
                f"{os.path.basename(name)} it left there once the folder is fixed")
    return None


def unappendable(file: str | os.PathLike) -> str | None:
    """Why an existing file the server appends to (an audit log, a version history) cannot be opened for appending
    (None when it can, or when it does not exist yet: its folder is checked by :func:`unwritable`). Opened and
    closed, nothing written."""
    path = os.fspath(file)
    if not os.path.lexists(path):
        return None
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
    except OSError as error:
        return f"cannot append to it: {error.strerror or type(error).__name__}"
    return None


def check_writable(folders: list[tuple[str, str | os.PathLike, str]],
                   files: list[tuple[str, str | os.PathLike, str]] = ()) -> None:
    """Each ``(what, path, what the server writes there)``: :class:`ConfError` naming the first folder that the
    server cannot write (:func:`unwritable`) or existing file it cannot append to (:func:`unappendable`), at
    start-up rather than as a traceback at the first verdict, correction, training or rollback. Nothing is written
    but the probe file, which is removed."""
    checks = [(entry, unwritable) for entry in folders] + [(entry, unappendable) for entry in files]
    for (what, place, purpose), problem_of in checks:
        problem = problem_of(place)
        if problem:
            raise ConfError(f"{what} {os.fspath(place)}: {problem}. The server writes {purpose} there: make it "
                            "a folder that the user running the server can write (or name another one)")
