"""Pleura's results in a real OHIF viewer: what a radiologist sees, read off the screen.

`pleura serve` (embedded) delivers its SRs and SCs into an Orthanc with DICOMweb that also holds the
source images; OHIF (the build pinned in tests/viewer/package.json, the configuration compose.yaml
mounts) opens each study in headless Chromium (tests/viewer/ohif.py). For every study the test
double-clicks the newest SR and the newest SC, as a radiologist would, and asserts:

- nothing on screen says OHIF failed ("Something went wrong", an exception, an error notification);
- every finding of the study's current job in the ledger that the SR marks on an image (every
  positive one with a map; the triage score when nothing is positive) is drawn there with its name
  and probability, ``"<code meaning>: <100 * probability, 2 decimals> %"`` (OHIF's label for a
  TID 1500 NUM), within 0.011 (JavaScript rounding), and no other label is;
- the heatmap SC renders (a lit canvas), and so does the source image under the SR's marks unless
  the study says OHIF cannot draw it;
- a study that arrives in two parts is shown with its second SR (the one that supersedes the first):
  OHIF lists one SR series and opens its newest instance.

Screenshots go to build/figures/ohif-<study>.png (the SR) and ohif-<study>-sc.png (the SC), the
counts to build/figures/viewer_ohif.json and one summary line on stdout.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicom_node.scu import send_datasets
from tests.dicom_node.dirty_sources import dirty_variants
from tests.e2e.harness import embedded_env, pleura, running, wait_for, wait_port
from tests.figures import FIGURES_DIR, save
from tests.support import NIH, REAL_CR, ROOT, free_port
from tests.viewer.ohif import OHIF_VERSION, Target, ViewerStack, ViewResult, missing, viewer_stack
from worker.ledger.db import Ledger
from worker.ledger.models import (
    Delivery,
    DeliveryState,
    Finding,
    Instance,
    Job,
    JobState,
    OutputObject,
    Study,
    StudyState,
)
from worker.synth.studies import png_to_dataset, read_labels

#: a browser that draws images: run alone, after the parallel suite (Makefile)
pytestmark = [pytest.mark.integration, pytest.mark.alone]

QUIET = 1
#: OHIF prints the NUM's value with toFixed(2); the ledger keeps the model's float.
TOLERANCE = 0.011
MANIFEST = ROOT / "engines" / "bundles" / "demo" / "manifest.json"
_LABEL = re.compile(r"^(?P<name>.+?):\s*(?P<value>-?\d+(?:\.\d+)?)\s*%$")


@dataclass
class ViewerStudy:
    """One study the viewer test sends and then opens.

    ``batches`` are sent in turn (to Orthanc and to Pleura), each once the previous one's results
    are delivered: a second batch makes a revision whose SR supersedes the first. ``texts``: lines
    that must be on screen with the study's newest SR (e.g. the sentence of a not-analysed notice).
    ``heatmaps``: Pleura sends an SC for this study. ``source_renders``: OHIF can draw the source
    image itself (False, with the reason in the builder, when the source is what it cannot draw).
    """

    name: str
    batches: list[list[Dataset]]
    texts: tuple[str, ...] = ()
    heatmaps: bool = True
    source_renders: bool = True
    study_uid: str = field(init=False)

    def __post_init__(self) -> None:
        uids = {str(ds.StudyInstanceUID) for batch in self.batches for ds in batch}
        assert len(uids) == 1, f"{self.name}: one study per ViewerStudy"
        self.study_uid = uids.pop()


def _nih(index: int, modality: str, study_uid: str | None = None) -> Dataset:
    row = read_labels(NIH / "labels.csv")[index]
    return png_to_dataset(NIH / "images" / row["image"], row, modality=modality, study_uid=study_uid)


def real_cr() -> ViewerStudy:
    # RG1_J2KI.dcm has Pixel Spacing 0\0: OHIF 3.13.2 (GPU rendering) draws that image black and
    # puts the SR's marks at NaN (the label ends up in the viewport's corner). A property of the
    # source, not of Pleura's objects; the findings text is still checked.
    return ViewerStudy("real-cr", [[dcmread(REAL_CR)]], source_renders=False)


def nih_study(index: int, modality: str) -> Callable[[], ViewerStudy]:
    def build() -> ViewerStudy:
        return ViewerStudy(f"nih-{index}-{modality.lower()}", [[_nih(index, modality)]])
    build.__name__ = f"nih_{index}_{modality.lower()}"
    return build


def revision() -> ViewerStudy:
    """A PA image, then (after its results) a second image of the same patient in the same series.

    OHIF 3.13.2 shows an SR's marks on the image of its first mark, alone in the viewport: its
    arrows set a view reference that this one-image stack does not hold, so marks on the other
    image are not reachable there (counted as such, not checked); the driver still tries them.
    """
    first = _nih(4, "CR")
    late = _nih(9, "CR", study_uid=first.StudyInstanceUID)
    for keyword in ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
                    "PatientAge", "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "SeriesInstanceUID",
                    "SeriesDate", "SeriesTime", "SeriesDescription"):
        setattr(late, keyword, getattr(first, keyword))
    late.SOPInstanceUID = generate_uid()
    late.file_meta.MediaStorageSOPInstanceUID = late.SOPInstanceUID
    late.InstanceNumber = 2
    return ViewerStudy("revision", [[first], [late]])


def child() -> ViewerStudy:
    """A chest X-ray of a 12-year-old: below the demo bundle's minimum age, so Pleura answers with
    a not-analysed notice (a TID 2000 SR), which OHIF shows as text."""
    ds = _nih(10, "CR")
    ds.PatientAge = "012Y"
    ds.PatientBirthDate = f"{int(ds.StudyDate[:4]) - 12}{ds.StudyDate[4:]}"
    return ViewerStudy("not-analysed-child", [[ds]], heatmaps=False,
                       texts=("Not analysed by AI model demo 0.1.0: patient age",))


def dirty(name: str, source_renders: bool = True) -> Callable[[], ViewerStudy]:
    """A dirty-source variant (tests/dicom_node/dirty_sources.py) as a study of its own."""
    def build() -> ViewerStudy:
        (variant,) = [v for v in dirty_variants(dcmread(REAL_CR), _nih(3, "DX")) if v.name == name]
        ds = variant.dataset
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (generate_uid() for _ in range(3))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        return ViewerStudy(f"dirty-{name}", [[ds]], source_renders=source_renders)
    build.__name__ = f"dirty_{name}"
    return build


#: The studies the viewer test opens, in the order they are sent. Add variants here (dirty sources,
#: a study Pleura does not analyse and answers with a not-analysed SR: ``texts=(...)``,
#: ``heatmaps=False``); each builder returns a ViewerStudy with its own Study Instance UID.
STUDY_BUILDERS: list[Callable[[], ViewerStudy]] = [
    real_cr,
    nih_study(0, "CR"),   # Cardiomegaly
    nih_study(1, "DX"),   # Atelectasis, Effusion
    nih_study(2, "CR"),   # No Finding
    nih_study(6, "DX"),   # AP: Atelectasis, Effusion, ...
    revision,
    child,
    dirty("cr_as_sc_age_62", source_renders=False),  # the real CR again: Pixel Spacing 0\0
]


@pytest.fixture(scope="session")
def ohif(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ViewerStack]:
    reason = missing()
    if reason:
        pytest.skip(reason)
    with viewer_stack(tmp_path_factory.mktemp("ohif")) as stack:
        yield stack


def _meanings() -> dict[str, str]:
    return {f["name"]: f["code"]["meaning"] for f in json.loads(MANIFEST.read_text())["findings"]}


def _current_job(ledger: Ledger, study_uid: str) -> tuple[int, int] | None:
    """(job id, revision) of the study's newest job once it succeeded and all its outputs are delivered."""
    with ledger.session() as s:
        study = s.scalars(select(Study).where(Study.study_instance_uid == study_uid)).first()
        if study is None or study.state != StudyState.DONE:
            return None
        job = s.scalars(select(Job).where(Job.study_id == study.id).order_by(Job.revision.desc())).first()
        if job is None or job.state != JobState.SUCCEEDED or job.revision != study.revision:
            return None
        states = s.scalars(select(Delivery.state).join(OutputObject).where(OutputObject.job_id == job.id)).all()
        return (job.id, job.revision) if states and set(states) == {DeliveryState.DELIVERED} else None


def _wait_delivered(ledger: Ledger, studies: list[ViewerStudy], revision: int) -> dict[str, int]:
    def done() -> dict[str, int] | None:
        jobs = {st.study_uid: _current_job(ledger, st.study_uid) for st in studies}
        return {uid: job[0] for uid, job in jobs.items() if job} if all(
            job and job[1] == revision for job in jobs.values()) else None

    return wait_for(done, 60 + 15 * len(studies), f"revision {revision} of {len(studies)} studies delivered",
                    interval=0.5)


def _outputs(ledger: Ledger, job_id: int) -> list[tuple[str, str, str]]:
    """(kind, SOP Instance UID, outbox path) of the job's outputs."""
    with ledger.session() as s:
        rows = s.execute(select(OutputObject.kind, OutputObject.sop_instance_uid, OutputObject.path)
                         .where(OutputObject.job_id == job_id)).all()
    return [tuple(row) for row in rows]


def _findings(ledger: Ledger, job_id: int, meanings: dict[str, str]) -> dict[tuple[str, str], tuple[float, bool]]:
    """(source SOP Instance UID, code meaning) -> (100 * probability, positive) for the job's findings."""
    with ledger.session() as s:
        rows = s.execute(select(Instance.sop_instance_uid, Finding.finding, Finding.probability, Finding.positive)
                         .join(Instance, Instance.id == Finding.instance_id)
                         .where(Finding.job_id == job_id)).all()
    return {(sop, meanings[name]): (100.0 * probability, bool(positive)) for sop, name, probability, positive in rows}


def _marked(sr_path: Path) -> set[tuple[str, str]]:
    """(source SOP Instance UID, NUM concept meaning) of each Measurement Group under Imaging
    Measurements (DCM 126010): the findings the SR marks on an image, which OHIF draws."""
    sr = dcmread(sr_path)
    marked: set[tuple[str, str]] = set()
    for container in sr.ContentSequence:
        if container.ValueType != "CONTAINER" or container.ConceptNameCodeSequence[0].CodeValue != "126010":
            continue
        for group in container.get("ContentSequence", []):
            items = list(group.get("ContentSequence", []))
            sops = [image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                    for item in items if item.ValueType == "SCOORD"
                    for image in item.get("ContentSequence", []) if image.ValueType == "IMAGE"]
            for item in items:
                if item.ValueType == "NUM":
                    marked.update((sop, item.ConceptNameCodeSequence[0].CodeMeaning) for sop in sops)
    return marked


def _labels(view: ViewResult) -> list[tuple[str, float]]:
    found = []
    for line in view.annotations:
        match = _LABEL.match(line)
        if match:
            found.append((match["name"].strip(), float(match["value"])))
    return found


def _send(stack: ViewerStack, pleura_port: int, batch: list[Dataset]) -> None:
    stack.orthanc.store(batch)  # the PACS holds the sources, as it would before forwarding them
    results = send_datasets("127.0.0.1", pleura_port, [(str(ds.SOPInstanceUID), ds) for ds in batch],
                            called_ae="PLEURA", calling_ae="MODALITY")
    assert all(r.ok for r in results), results


@dataclass
class _Checked:
    study: ViewerStudy
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    view_seconds: list[float] = field(default_factory=list)
    srs_clean: int = 0
    marks: int = 0
    expected: int = 0
    found: int = 0
    not_marked: int = 0
    unreachable: int = 0
    scs_rendered: int = 0
    scs: int = 0


def _check(stack: ViewerStack, ledger: Ledger, study: ViewerStudy, job_id: int,
           meanings: dict[str, str]) -> _Checked:
    checked = _Checked(study)
    outputs = _outputs(ledger, job_id)
    srs = [(sop, Path(path)) for kind, sop, path in outputs if kind.startswith("SR")]
    assert len(srs) == 1, f"{study.name}: one SR per job, got {outputs}"
    sr_sop, sr_path = srs[0]
    sc_sops = sorted(sop for kind, sop, _ in outputs if kind == "SC")
    targets = [Target(FIGURES_DIR / f"ohif-{study.name}.png", sr_sop, drawn=study.source_renders and not study.texts)]
    targets += [Target(FIGURES_DIR / f"ohif-{study.name}-sc{'' if i == 0 else i + 1}.png", sop, "OT")
                for i, sop in enumerate(sc_sops)]
    views = stack.viewer.view(study.study_uid, targets)
    unmarked = not study.texts and _marked(sr_path) and not _labels(views[0])
    undrawn = study.source_renders and not study.texts and not views[0].image_shown
    if unmarked or undrawn:
        # OHIF 3.13.2 now and then draws an SR's marks before their image is in the viewport and
        # then never, or leaves that image black: the study is opened once more, as a reader
        # would, and noted.
        missing = " and ".join(what for what, miss in (("marks", unmarked), ("source image", undrawn)) if miss)
        checked.notes.append(f"the SR's {missing} not drawn on the first opening; opened again")
        views = stack.viewer.view(study.study_uid, targets)
    sr_view, sc_views = views[0], views[1:]
    checked.view_seconds = [view.seconds for view in views]
    problem = checked.problems.append

    if sr_view.errors:
        problem(f"SR: errors on screen: {sr_view.errors} (console: {sr_view.console[:3]})")
    elif not sr_view.shows_target:
        problem("SR: not shown after a double-click on its thumbnail")
    else:
        checked.srs_clean = 1
    if study.source_renders and not study.texts and not sr_view.image_shown:
        problem(f"SR: the source image under the marks is not drawn (canvas {sr_view.viewport})")
    for text in study.texts:
        if not any(text in line for line in sr_view.texts):
            problem(f"SR: {text!r} not on screen")

    findings = _findings(ledger, job_id, meanings)
    marks = _marked(sr_path)
    visited = set(sr_view.shown.get("visitedSops") or [])
    labels = _labels(sr_view)
    for mark in sorted(marks - findings.keys()):
        problem(f"SR: marks {mark}, which is not among the job's findings in the ledger")
    for (sop, meaning), (percent, positive) in sorted(findings.items()):
        if (sop, meaning) not in marks:
            checked.not_marked += positive  # kept in the SR's Qualitative Evaluations, which OHIF does not draw
            continue
        if sop not in visited:
            checked.unreachable += 1  # on an image the SR viewport did not show (see revision())
            continue
        checked.marks += 1
        checked.expected += positive
        if any(name == meaning and abs(value - percent) <= TOLERANCE for name, value in labels):
            checked.found += positive
        else:
            problem(f"SR: '{meaning}: {percent:.2f} %' ({'positive' if positive else 'negative'}) not drawn "
                    f"(labels on screen: {sr_view.annotations})")
    shown = [(m, p) for (sop, m), (p, _) in findings.items() if (sop, m) in marks and sop in visited]
    for name, value in labels:
        if not any(name == m and abs(value - p) <= TOLERANCE for m, p in shown):
            problem(f"SR: label '{name}: {value:.2f} %' on screen matches no finding the SR marks")
    if marks and not visited:
        problem("SR: no image with the SR's marks was shown")

    for view in sc_views:
        checked.scs += 1
        if view.errors:
            problem(f"SC {view.shown.get('target', {}).get('sops')}: errors on screen: {view.errors}")
        elif not (view.shows_target and view.image_shown):
            problem(f"SC: the heatmap image is not drawn (canvas {view.viewport})")
        else:
            checked.scs_rendered += 1
    if study.heatmaps and not sc_sops:
        problem("no SC in the job's outputs")
    if study.batches[1:]:  # a revision: OHIF shows an SR series by its newest instance
        shown_sop = (sr_view.shown.get("target") or {}).get("sop")
        if shown_sop != sr_sop:
            problem(f"SR: OHIF shows {shown_sop}, not the superseding SR {sr_sop}")
        if len(visited) < len({sop for sop, _ in marks}):
            checked.notes.append(f"marks on {len({sop for sop, _ in marks})} images, OHIF's SR viewport "
                                 f"showed {len(visited)}")
    return checked


def _validate_outputs(outbox: Path, dciodvfy, dsrdump, pixelmed_sr) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """Every object Pleura made here (revisions, dirty sources, the notice included): 0 errors
    from dciodvfy on each, from dsrdump and pixelmed's DicomSRValidator on each SR."""
    files = sorted(outbox.rglob("*.dcm"))
    srs = [f for f in files if dcmread(f, stop_before_pixels=True).Modality == "SR"]
    problems = {f.name: errors for f in files if (errors := dciodvfy(f)[0])}
    problems |= {f"{f.name} (dsrdump)": ["exit non-zero"] for f in srs if dsrdump(f).returncode}
    problems |= {f"{path.name} (pixelmed)": errors
                 for path, (errors, _) in pixelmed_sr(srs).items() if errors}
    assert problems == {}, problems
    return {"objects": len(files), "srs": len(srs)}


def test_results_open_in_ohif(ohif: ViewerStack, tmp_path: Path, dciodvfy, dsrdump,  # type: ignore[no-untyped-def]
                              pixelmed_sr) -> None:
    if not REAL_CR.is_file() or not (NIH / "labels.csv").is_file():
        pytest.skip(f"the shared data folder is not beside the repo ({REAL_CR.parent.parent})")
    started = time.monotonic()
    studies = [build() for build in STUDY_BUILDERS]
    meanings = _meanings()
    port = free_port()
    # results reach the viewer's Orthanc by DICOMweb STOW-RS, each confirmed by QIDO-RS (C-STORE into
    # Orthanc: tests/worker/deliver/test_stow_orthanc.py)
    env = {**embedded_env(tmp_path, port, ohif.orthanc.dicom_port, QUIET),
           "PLEURA_DESTINATIONS": f"http://127.0.0.1:{ohif.orthanc.http_port}/dicom-web",
           "PLEURA_SWEEP_INTERVAL_SECONDS": "0.5"}
    serve = pleura("serve", env, tmp_path / "serve.log")
    checked: list[_Checked] = []
    with running(serve):
        wait_port(port, serve, timeout=120)
        ledger = Ledger(f"sqlite:///{tmp_path / 'var' / 'pleura.db'}")
        for study in studies:
            _send(ohif, port, study.batches[0])
        jobs = _wait_delivered(ledger, studies, revision=1)
        later = [study for study in studies if len(study.batches) > 1]
        for study in later:  # Pleura works on these while the viewer opens the others
            _send(ohif, port, study.batches[1])
        delivered = time.monotonic()
        for study in studies:
            if study not in later:
                checked.append(_check(ohif, ledger, study, jobs[study.study_uid], meanings))
        if later:
            assert all(len(study.batches) == 2 for study in later), "a third batch needs another round here"
            jobs = _wait_delivered(ledger, later, revision=2)
            for study in later:
                checked.append(_check(ohif, ledger, study, jobs[study.study_uid], meanings))
        ledger.engine.dispose()
        validated = _validate_outputs(tmp_path / "var" / "outbox", dciodvfy, dsrdump, pixelmed_sr)
        log = (tmp_path / "serve.log").read_text()
        for study in studies:
            for ds in study.batches[0]:
                for phi in (str(ds.PatientName), str(ds.PatientID)):
                    assert phi not in log, "patient identifiers must never reach the logs"

    keys = ("srs_clean", "marks", "expected", "found", "not_marked", "unreachable", "scs_rendered", "scs")
    totals = {key: sum(getattr(c, key) for c in checked) for key in keys}
    seconds = round(time.monotonic() - started, 1)
    print(f"\nOHIF {OHIF_VERSION}: {len(checked)} studies, {totals['srs_clean']}/{len(checked)} SRs opened without "
          f"error, {totals['found']}/{totals['expected']} positive findings on screen with their probability "
          f"({totals['marks']} marks checked; {totals['not_marked']} positives the SR does not mark, "
          f"{totals['unreachable']} marks on images the SR viewport does not show), {totals['scs_rendered']}/"
          f"{totals['scs']} heatmap SCs drawn; {seconds} s in all, {round(time.monotonic() - delivered, 1)} s "
          f"from the first results to the last check; {validated['objects']} objects made "
          f"({validated['srs']} SRs): 0 errors from dciodvfy, dsrdump and pixelmed")
    for c in checked:
        for note in c.notes:
            print(f"  {c.study.name}: {note}")
    save("viewer_ohif", {"ohif": OHIF_VERSION, "studies": len(checked), **totals, "seconds": seconds,
                         "validated": validated,
                         "per_study": {c.study.name: {"problems": c.problems, "notes": c.notes,
                                                      "view_seconds": c.view_seconds,
                                                      **{key: getattr(c, key) for key in keys}}
                                       for c in checked}})
    problems = [f"{c.study.name}: {p}" for c in checked for p in c.problems]
    assert not problems, "\n".join(problems)
