"""The series of a folder tree and where each one's denoised result goes.

A folder's DICOM image files are grouped by SeriesInstanceUID (:func:`lib.imaging.list_dicom_series`: several
series may share a folder, hard-anonymised files with an empty UID form one series); every NIfTI, NRRD or
MetaImage file is a series of its own. Hidden files and folders (name starting with "."), the output folder when
it lies inside the input tree, and the output folders of other runs (holding a ``_denoise_batch`` folder) are not
searched; a folder reached twice (a symlink loop, two links to one folder) is searched once; DICOM series this app
derived (SeriesDescription holding "[denoised", or ImageType DERIVED/.../DENOISED once anonymised) are never
inputs. A folder that cannot be listed (permissions) is a failed series of its own, never passed over in silence;
a series whose folder holds a file that cannot be read (damaged, or the storage failed: EIO, a link loop) or one
image twice (one SOPInstanceUID) is refused here, naming the file (:func:`_series_problem`), before its earlier
output could be taken for that of a series with other slices.

Output paths mirror the tree under the output root, and are unique per series:

* ``ROOT/a/b/x.nii.gz`` -> ``OUT/a/b/x.nii.gz`` (same file type; ``.nhdr`` -> ``.nrrd``, which ITK cannot write
  as a detached header);
* a DICOM series in ``ROOT/a/b/`` -> the derived-series folder ``OUT/a/b/series_<SeriesNumber>_<8 hex of the
  SHA-1 of its SeriesInstanceUID>/`` (a folder per series, so that several series of one folder, and the series
  of its subfolders, never land in the same place).

Two series whose outputs would be the same path, or one inside the other, are both refused
(:attr:`SeriesItem.problem`) rather than written over each other. A SeriesInstanceUID found in more than one study or
under more than one patient (a mis-merged or mis-anonymised archive) is refused wherever it is found
(:func:`refuse_reused_uids`): a job is its UID alone, so each copy would take the others for the same series moved.
Sizes (voxels) come from the headers only.
"""
from __future__ import annotations

import errno
import filecmp
import fnmatch
import hashlib
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pydicom

from ..imaging import READ_SUFFIXES, ImageReadError, list_dicom_series
from ..imaging.errors import UnreadableDicomError
from ..imaging.io import check_image_file

__all__ = ["DERIVED_MARK", "MANIFEST_DIR", "SeriesFilter", "SeriesItem", "check_roots", "discover_tree",
           "is_our_result", "refuse_collisions", "refuse_reused_uids"]

#: the batch's own folder inside the output root (manifests); no series output may go there
MANIFEST_DIR = "_denoise_batch"
#: what the SeriesDescription of a series written by this app contains (" [denoised <model>]"): never an input
DERIVED_MARK = "[denoised"
_NHDR = ".nhdr"

log = logging.getLogger(__name__)


def is_our_result(description: str, image_type) -> bool:
    """Whether a series is a result of this app: SeriesDescription holding "[denoised", or ImageType
    DERIVED\\...\\DENOISED (DENOISED from the 4th value on, as this app writes), which anonymisers keep when they
    remove the description (the basic profile does)."""
    values = [str(v).upper() for v in (image_type or [])]
    return DERIVED_MARK in (description or "") or (values[:1] == ["DERIVED"] and "DENOISED" in values[3:])


@dataclass(frozen=True)
class SeriesFilter:
    """Which DICOM series to take, by their tags: ``modality`` (e.g. "CT"), ``study_dates`` (first, last) as
    YYYYMMDD, inclusive (either may be None), ``description`` (shell pattern, case-insensitive, on
    SeriesDescription). Files without DICOM tags (NIfTI, NRRD, MHA) are left out when any filter is set."""

    modality: str | None = None
    study_dates: tuple[str | None, str | None] | None = None
    description: str | None = None

    @property
    def active(self) -> bool:
        return bool(self.modality or self.study_dates or self.description)

    def accepts(self, modality: str, study_date: str, description: str) -> bool:
        if self.modality and modality.upper() != self.modality.upper():
            return False
        if self.study_dates:
            first, last = self.study_dates
            if not study_date or (first and study_date < first) or (last and study_date > last):
                return False
        if self.description and not fnmatch.fnmatch(description.lower(), self.description.lower()):
            return False
        return True


def parse_date_range(text: str) -> tuple[str | None, str | None]:
    """``"20200101-20201231"``, ``"20200101-"``, ``"-20201231"`` or ``"20200101"`` (one day) -> (first, last).

    Raises:
        ValueError: not YYYYMMDD dates.
    """
    parts = text.split("-") if "-" in text else [text, text]
    if len(parts) != 2 or not all(re.fullmatch(r"\d{8}", p) for p in parts if p) or not any(parts):
        raise ValueError(f"--study-date must be YYYYMMDD-YYYYMMDD (either end may be left out), got {text!r}")
    return parts[0] or None, parts[1] or None


@dataclass(frozen=True)
class SeriesItem:
    """One series to denoise.

    ``key``: stable name within the input ("file:<relative path>", "dicom:<relative folder>#<uid>",
    "dicomweb:<study>/<series>"); ``kind``: "file", "dicom" or "dicomweb"; ``source``: the file or folder (or
    the DICOMweb series URL); ``series_uid`` / ``study_uid``: the DICOM UIDs ("" when empty, None for files);
    ``voxels``: size for sharding (0 when the header could not be read: the series then fails when it is
    read, with the reader's message); ``output``: the result's path; ``problem``: why the series is refused
    before reading (e.g. an output collision), else None; ``input_refused``: that reason is its input's (unreadable,
    split over folders, a folder gone), not its output's: an output an earlier run wrote under its name is then moved
    aside, unless its files still hash to that run's record (the folder it was made from, unchanged).
    ``keeps_output``: refused for a reason that says nothing against an output an earlier run made of it (a file the
    storage cannot read now, a slice copied twice byte for byte): that output is left in place, and a rerun compares it
    again. ``studies`` / ``patients``: the StudyInstanceUIDs and PatientIDs its instances are filed under (DICOM series;
    one each in a sound archive); ``uid_reused``: refused because its SeriesInstanceUID is also found in another
    study or under another patient (:func:`refuse_reused_uids`): nothing of its job is asked, stored or reported.
    ``instances``: the SOPInstanceUIDs of a folder's DICOM series (told apart: a series split over folders, or
    copied).
    """

    key: str
    kind: str
    source: str
    output: Path
    voxels: int = 0
    series_uid: str | None = None
    study_uid: str | None = None
    files: tuple[str, ...] = field(default=(), compare=False, repr=False)
    problem: str | None = None
    input_refused: bool = False
    studies: tuple[str, ...] = field(default=(), compare=False, repr=False)
    patients: tuple[str, ...] = field(default=(), compare=False, repr=False)
    uid_reused: bool = False
    keeps_output: bool = False
    instances: tuple[str, ...] = field(default=(), compare=False, repr=False)


def check_roots(root: Path, out: Path) -> None:
    """Refuse an output root that is the input root or holds it (outputs mirror the tree: they could land on
    the inputs). An output root inside the input tree is fine when it is new, empty or a batch's output root (it is
    not searched); one that already holds other files is refused: its series would be passed over in silence,
    and the results mixed in with them.

    Raises:
        ValueError: as said.
    """
    root, out = root.resolve(), out.resolve()
    if out == root:
        raise ValueError("--output is the input folder itself: choose another folder (inputs are never overwritten)")
    if out in root.parents:
        raise ValueError(f"--output {out} holds the input folder {root}: choose a folder outside it")
    if root in out.parents and out.is_dir() and not (out / MANIFEST_DIR).is_dir():
        held = sorted(entry.name for entry in out.iterdir())
        if held:
            raise ValueError(f"--output {out} lies inside the input folder and already holds {len(held)} entr"
                             f"{'y' if len(held) == 1 else 'ies'} ({', '.join(held[:3])}) that are not a batch's "
                             "results: they would not be denoised (the output is not searched); choose a new or "
                             "empty folder")


def _dicom_label(uid: str, number: int | None) -> str:
    digest = hashlib.sha1(uid.encode()).hexdigest()[:8] if uid else "nouid"
    return f"series_{number if number is not None else 'na'}_{digest}"


def _file_output(rel: Path, out_root: Path) -> Path:
    if rel.name.lower().endswith(_NHDR):
        rel = rel.with_name(rel.name[: -len(_NHDR)] + ".nrrd")
    return out_root / rel


def _file_voxels(path: Path) -> int:
    try:
        size = check_image_file(path)
    except (ImageReadError, OSError):
        return 0
    voxels = 1
    for v in size:
        voxels *= int(v)
    return voxels


def _dicom_items(folder: Path, rel: Path, out_root: Path, series_filter: SeriesFilter) -> list[SeriesItem]:
    try:
        series = list_dicom_series(folder)
    except UnreadableDicomError as error:  # DICOM files, none readable: reported, not passed over
        return [SeriesItem(key=f"dicom:{rel.as_posix() or '.'}#", kind="dicom", source=str(folder),
                           output=out_root / rel / _dicom_label("", None), series_uid="", problem=str(error),
                           input_refused=not error.read_error, keeps_output=error.read_error)]
    except ImageReadError:
        return []  # no DICOM image file here
    items = []
    for s in series:
        try:
            head = pydicom.dcmread(str(s["files"][0]), stop_before_pixels=True, force=True)
            frames = int(float(head.get("NumberOfFrames", 1) or 1))
            voxels = len(s["files"]) * frames * int(head.get("Rows", 0) or 0) * int(head.get("Columns", 0) or 0)
            study_date = str(head.get("StudyDate", "") or "")
            study_uid = str(head.get("StudyInstanceUID", "") or "")
            image_type = [str(v).upper() for v in (head.get("ImageType", None) or [])]
        except Exception:  # noqa: BLE001 - an unreadable header: the series fails later with the reader's message
            voxels, study_date, study_uid, image_type = 0, "", "", []
        if not series_filter.accepts(s["modality"], study_date, s["description"]):
            continue
        # this app's result (copied into the archive): never denoised twice. ImageType tells it too once an
        # anonymiser has removed SeriesDescription (the basic profile does; it keeps ImageType)
        if is_our_result(s["description"], image_type):
            log.warning("not denoised: series %s in %s is a result of this app (%r)", s["uid"], folder,
                        s["description"])
            continue
        problem, refused, keeps = _series_problem(folder, s)
        rel_folder = rel.as_posix() or "."
        items.append(SeriesItem(key=f"dicom:{rel_folder}#{s['uid']}", kind="dicom", source=str(folder),
                                output=out_root / rel / _dicom_label(s["uid"], s["series_number"]), voxels=voxels,
                                series_uid=s["uid"], study_uid=study_uid,
                                files=tuple(str(f) for f in s["files"]), studies=tuple(s["study_uids"]),
                                patients=tuple(s["patient_ids"]), problem=problem, input_refused=refused,
                                keeps_output=keeps, instances=tuple(s["instances"])))
    return items


def _series_problem(folder: Path, series: dict) -> tuple[str | None, bool, bool]:
    """(why the series of ``folder`` (:func:`list_dicom_series`) cannot be read, ``input_refused``, ``keeps_output``),
    told before it is read, so that its earlier output is not first set aside as that of a series with other slices
    (the file left out changed its voxel count). A file of the folder that cannot be read: a damaged one is evidence
    against that output (``input_refused``), a read error of the storage is not (a transient EIO, a link loop, a
    dropped share: ``keeps_output``), and the series is never denoised without it. Two files holding one
    SOPInstanceUID (the reader refuses them: one image twice): every such pair is compared; all byte for byte the
    same, slices copied twice (the output stays); any pair of other contents, two versions of one image (which one its
    output was made from is unknown), whatever the other pairs hold."""
    if series["unreadable"]:
        return series["unreadable"], not series["read_error"], series["read_error"]
    if not series["same_instance"]:
        return None, False, False
    where = f"{folder} (series {series['uid'] or 'with empty SeriesInstanceUID'})"

    def more(shown: int) -> str:
        others = len(series["same_instance"]) - shown
        return f" (and {others} more)" if others else ""

    unread = None
    for first, copy, sop in series["same_instance"]:  # every pair: a copy of one slice hides no version of another
        try:
            identical = filecmp.cmp(first, copy, shallow=False)
        except OSError as error:
            unread = unread or (copy, error)
            continue
        if not identical:
            return (f"{where}: {first.name} and {copy.name} hold other contents under one SOPInstanceUID ({sop})"
                    f"{more(1)}: two versions of one image; keep the right one"), True, False
    if unread is not None:
        copy, error = unread
        return (f"{where}: {copy.name} cannot be read from the storage ({error.strerror or error}); a series is not "
                "read without it: check the storage, then try again"), False, True
    first, copy, sop = series["same_instance"][0]
    return (f"{where}: {first.name} and {copy.name} are the same image (SOPInstanceUID {sop}), byte for byte"
            f"{more(1)}: one slice copied twice; remove the copy"), False, True


def discover_tree(root: str | os.PathLike, out_root: str | os.PathLike,
                  series_filter: SeriesFilter | None = None) -> list[SeriesItem]:
    """Every series under ``root`` with its output path under ``out_root``, in a deterministic order (sorted
    by key), the same on every rank that sees the same files. Reads headers only (memory O(one header)).

    Raises:
        ValueError: ``root`` is not a folder, or ``out_root`` is or holds ``root``.
    """
    root, out_root = Path(root).expanduser(), Path(out_root).expanduser()
    if not root.is_dir():
        raise ValueError(f"--input {root} is not a folder (or a DICOMweb URL)")
    check_roots(root, out_root)
    series_filter = series_filter or SeriesFilter()
    out_resolved = out_root.resolve()
    items: list[SeriesItem] = []
    # every folder is searched once, under the first path that reaches it (walk order: sorted): a symlink back up
    # the tree (a loop) or a second link to one folder would list its series again under other paths, each then
    # refused as "split over N folders" and never denoised
    seen = {root.resolve()}

    def unlisted(error: OSError) -> None:  # a folder that cannot be listed: reported, never passed over in silence
        folder = Path(error.filename or root)
        rel = folder.relative_to(root) if folder.is_relative_to(root) else Path(folder.name)
        items.append(SeriesItem(key=f"dicom:{rel.as_posix() or '.'}#", kind="dicom", source=str(folder),
                                output=out_root / rel / _dicom_label("", None), series_uid="",
                                problem=f"cannot list the folder {folder}: {error.strerror or error}",
                                # a folder gone is evidence against an output of its; one unreadable now is not
                                input_refused=error.errno in (errno.ENOENT, errno.ENOTDIR)))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unlisted, followlinks=True):
        here = Path(dirpath)
        # never search the output (when it lies inside the input tree) nor hidden folders (temporary outputs)
        kept = []
        for name in sorted(d for d in dirnames if not d.startswith(".")):
            real = (here / name).resolve()
            if real == out_resolved or out_resolved in real.parents or real in seen:
                continue
            seen.add(real)
            if (real / MANIFEST_DIR).is_dir():  # another run's output root: its series are this app's results
                log.warning("not searched: %s holds the results of another denoise-batch run (%s/)", here / name,
                            MANIFEST_DIR)
                continue
            kept.append(name)
        dirnames[:] = kept
        rel = here.relative_to(root)
        items.extend(_dicom_items(here, rel, out_root, series_filter))
        if series_filter.active:
            continue  # image files carry no tags to filter on
        for name in sorted(filenames):
            if name.startswith(".") or not name.lower().endswith(READ_SUFFIXES):
                continue
            path = here / name
            items.append(SeriesItem(key=f"file:{(rel / name).as_posix()}", kind="file", source=str(path),
                                    output=_file_output(rel / name, out_root), voxels=_file_voxels(path)))
    return refuse_reused_uids(refuse_split_series(refuse_collisions(sorted(items, key=lambda item: item.key),
                                                                    out_root)))


def _listed(values: list[str], one: str, several: str) -> str:
    """``values`` named in a sentence: "study A", "studies A and B", "studies A, B, C and 2 more"."""
    shown = [value or "(empty)" for value in values[:3]]
    if len(values) > 3:
        shown.append(f"{len(values) - 3} more")
    words = shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} and {shown[-1]}"
    return f"{one if len(values) == 1 else several} {words}"


def refuse_reused_uids(items: list[SeriesItem], also: Iterable[tuple[str, str, str]] = ()) -> list[SeriesItem]:
    """``items`` with :attr:`SeriesItem.problem` set (and ``uid_reused``) on every DICOM series whose
    SeriesInstanceUID is found, among ``items`` and ``also`` ((series UID, study UID, PatientID) of other series
    listed, e.g. filtered out), in more than one study or under more than one patient: a mis-merged or
    mis-anonymised archive. A job is its series UID alone, so each copy took the other for the same series moved to
    another study and was redone (and, with ``--store-to-pacs``, stored again) on every run, the other's valid
    derived series reported superseded; a denoised copy could land in another patient's study. None of them is
    denoised, stored or reported until the archive is fixed; an earlier output of a folder's series is moved aside
    (``input_refused``, as for a series split over folders) unless the folder's files still hash to the record it was
    made from (a copy added elsewhere leaves the original's output); one of a DICOMweb series is left in place (filed
    under its own study; a rerun compares it before using it). Series without a UID (hard-anonymised) are told
    apart by their contents instead."""
    studies: dict[str, set[str]] = {}
    patients: dict[str, set[str]] = {}
    for item in items:
        if item.kind in ("dicom", "dicomweb") and item.series_uid:
            studies.setdefault(item.series_uid, set()).update(item.studies or (item.study_uid or "",))
            patients.setdefault(item.series_uid, set()).update(item.patients)
    for series_uid, study_uid, patient_id in also:
        if series_uid in studies:
            studies[series_uid].add(study_uid)
            patients[series_uid].add(patient_id)
    checked = []
    for item in items:
        uid = item.series_uid or ""
        if item.kind in ("dicom", "dicomweb") and uid and (len(studies[uid]) > 1 or len(patients[uid]) > 1):
            under = (f" (under {_listed(sorted(patients[uid]), 'patient', 'patients')})"
                     if any(patients[uid]) else "")  # a server that does not return PatientID: not named
            problem = (f"series UID {uid} is listed in {_listed(sorted(studies[uid]), 'study', 'studies')}{under}: "
                       "not denoised; fix the archive (one SeriesInstanceUID belongs to one study of one patient)")
            item = replace(item, problem=problem, input_refused=item.kind == "dicom", uid_reused=True)
        checked.append(item)
    return checked


def refuse_split_series(items: list[SeriesItem]) -> list[SeriesItem]:
    """``items`` with :attr:`SeriesItem.problem` set on every DICOM series whose SeriesInstanceUID is also found in
    another folder: each folder would be written as a partial series of its own, both under one record. The problem
    tells a copy (every folder holds the same SOPInstanceUIDs: keep one folder) and instances in more than one
    folder from a series split over folders (put its slices in one folder): putting a copy's slices in one folder
    would only have it refused as slices copied twice. Series with an empty UID (hard-anonymised) are told apart by
    their files' content instead."""
    folders: dict[str, dict[str, set[str]]] = {}
    for item in items:
        if item.kind == "dicom" and item.series_uid:
            folders.setdefault(item.series_uid, {}).setdefault(item.source, set()).update(item.instances)
    checked = []
    for item in items:
        where = folders.get(item.series_uid or "", {}) if item.kind == "dicom" else {}
        if len(where) > 1 and not item.problem:
            shown = ", ".join(sorted(where)[:3])
            held = list(where.values())
            folders_of = Counter(uid for instances in held for uid in instances)  # SOPInstanceUID -> folders
            repeated = sum(1 for count in folders_of.values() if count > 1)
            if folders_of and all(count == len(held) for count in folders_of.values()):
                problem = (f"series {item.series_uid} is copied whole in {len(where)} folders ({shown}): each holds "
                           f"all its {len(folders_of)} instances (the same SOPInstanceUIDs): keep one of the folders "
                           "and remove the other copies")
            elif repeated:
                problem = (f"series {item.series_uid} is split over {len(where)} folders ({shown}), {repeated} of its "
                           f"{len(folders_of)} instances in more than one of them (copies): put all its slices in one "
                           "folder, each instance once")
            else:
                problem = (f"series {item.series_uid} is split over {len(where)} folders ({shown}): put all its "
                           "slices in one folder")
            item = replace(item, problem=problem, input_refused=True)
        checked.append(item)
    return checked


def refuse_collisions(items: list[SeriesItem], out_root: Path) -> list[SeriesItem]:
    """``items`` with :attr:`SeriesItem.problem` set on every series whose output is another's, lies inside
    another's, or lies in the batch's own folder: none of them is written (never one over another)."""
    outputs = {item.key: item.output.resolve() for item in items}
    owners: dict[Path, list[str]] = {}
    holders: dict[Path, list[str]] = {}  # folder -> the series whose outputs lie inside it
    for key, path in outputs.items():
        owners.setdefault(path, []).append(key)
        for parent in path.parents:
            holders.setdefault(parent, []).append(key)
    reserved = (out_root / MANIFEST_DIR).resolve()
    checked = []
    for item in items:
        path = outputs[item.key]
        clash = [k for k in owners[path] if k != item.key]
        clash += [k for p in path.parents if p in owners for k in owners[p]]
        clash += holders.get(path, [])
        problem = None
        if clash:
            problem = f"its output {item.output} collides with the output of {sorted(set(clash))[0]}"
        elif path == reserved or reserved in path.parents:
            problem = f"its output {item.output} would lie in the batch's own folder {MANIFEST_DIR}"
        checked.append(replace(item, problem=problem) if problem else item)
    return checked
