"""The dashboard's flows end to end in Debian's Chromium (headless, Playwright).

Each test drives a fresh browser context against the seeded service on loopback
and saves a screenshot of every view it opens (see ``artifacts`` in conftest).
With ``CLINFUSE_UPDATE_SCREENSHOTS=1`` the patient page and the audit report are
also copied to ``docs/screenshots/`` for the README.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import pytest
from sqlalchemy import select

from services.auth import smart_launch
from services.tables import FeedbackRow, PatientRow, PredictionRow
from tests.conftest import IN_CI
from tests.dashboard.conftest import REPO, LiveService
from tests.dashboard.seed import CLINICIAN, COMPLIANCE

pytestmark = [pytest.mark.integration, pytest.mark.slow]

expect: Any
try:
    import pytest_playwright  # noqa: F401  (its fixtures: page, browser, context)
    from playwright.sync_api import Page, expect
except ImportError:
    if IN_CI:
        raise  # CI=true: a missing browser stack fails, it is not skipped
    pytest.skip("playwright / pytest-playwright are not installed (pip install -e '.[dev]')",
                allow_module_level=True)


def shot(page: Page, artifacts: Path, name: str, *, readme: bool = False,
         height: int | None = None) -> Path:
    """Screenshot the whole page; ``height``: a tall viewport instead (Chromium paints an
    iframe only where the viewport reaches, so a full-page shot cuts a long report)."""
    path = artifacts / f"{name}.png"
    if height is not None:
        page.set_viewport_size({"width": 1280, "height": height})
        page.wait_for_timeout(300)
        page.screenshot(path=str(path))
        page.set_viewport_size({"width": 1280, "height": 900})
    else:
        page.screenshot(path=str(path), full_page=True)
    if readme and os.environ.get("CLINFUSE_UPDATE_SCREENSHOTS") == "1":
        target = REPO / "docs" / "screenshots"
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target / f"{name}.png")
    return path


def login(page: Page, live: LiveService, user: tuple[str, str]) -> None:
    page.goto(f"{live.url}/dashboard/login")
    page.get_by_label("User name").fill(user[0])
    page.get_by_label("Password").fill(user[1])
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_load_state("networkidle")


def featured(live: LiveService) -> tuple[str, str]:
    """(opaque id, MRN) of the riskiest patient with imaging, notes, labs and a trend."""
    with live.session() as session:
        risk = {}
        for pid in live.demo.featured:
            latest = session.scalars(select(PredictionRow).where(
                PredictionRow.patient_id == pid).order_by(PredictionRow.created_at.desc())
            ).first()
            risk[pid] = latest.probability or 0.0
        pid = max(risk, key=lambda k: risk[k])
        mrn = session.get(PatientRow, pid).identifier_value
    return pid, mrn


# -- flow 1 -----------------------------------------------------------------------------


def test_1_clinician_logs_in(page: Page, live: LiveService, artifacts: Path) -> None:
    page.goto(f"{live.url}/dashboard/")
    expect(page).to_have_url(re.compile(r"/dashboard/login"))
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    shot(page, artifacts, "01-login")
    page.get_by_label("User name").fill(CLINICIAN[0])
    page.get_by_label("Password").fill("wrong-password")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("wrong password")
    login(page, live, CLINICIAN)
    expect(page).to_have_url(re.compile(r"/dashboard/worklist"))
    cookie = next(c for c in page.context.cookies() if c["name"] == "clinfuse_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    expect(page.get_by_text(f"{CLINICIAN[0]} (clinician)")).to_be_visible()


# -- flow 2 -----------------------------------------------------------------------------


def test_2_worklist_to_patient(page: Page, live: LiveService, artifacts: Path) -> None:
    login(page, live, CLINICIAN)
    rows = page.locator("table.worklist tbody tr")
    expect(rows).to_have_count(len(live.demo.patients))
    # Sorted by current risk, highest first.
    risks = [float(t.strip("<%")) for t in page.locator("td.risk .num").all_inner_texts()]
    assert risks == sorted(risks, reverse=True) and risks
    shot(page, artifacts, "02-worklist")
    page.get_by_role("link", name="Patient (MRN)").click()
    mrns = page.locator("table.worklist tbody th[scope=row]").all_inner_texts()
    assert mrns == sorted(mrns, reverse=True)
    page.get_by_role("link", name=re.compile(r"^Patient \(MRN\)")).click()
    expect(page.locator("th[aria-sort]")).to_have_attribute("aria-sort", "ascending")
    mrns = page.locator("table.worklist tbody th[scope=row]").all_inner_texts()
    assert mrns == sorted(mrns)
    page.goto(f"{live.url}/dashboard/worklist?band=high")
    for band in page.locator("td.risk .band").all_inner_texts():
        assert band == "High"

    pid, mrn = featured(live)
    page.goto(f"{live.url}/dashboard/worklist")
    page.get_by_role("link", name=mrn, exact=True).click()
    expect(page).to_have_url(f"{live.url}/dashboard/patients/{pid}")
    expect(page.get_by_role("heading", name=f"Patient {mrn}")).to_be_visible()
    risk = page.get_by_test_id("risk").inner_text()
    assert re.fullmatch(r"<?\d{1,3}%", risk)
    expect(page.locator(".risk-what")).to_contain_text("within 30 days")
    expect(page.get_by_text("Calibration:")).to_be_visible()
    expect(page.locator(".validation")).to_contain_text("Not validated for clinical use")
    expect(page.get_by_role("link", name="Model card")).to_have_count(2)
    expect(page.locator("svg.trend circle.dot")).to_have_count(3)
    expect(page.locator("svg.bars rect")).to_have_count(3)
    expect(page.locator("table.factors tbody tr").first).to_be_visible()
    expect(page.locator(".note-text mark").first).to_be_visible()
    # Every image has a text alternative; every plot a title.
    for img in page.locator("img").all():
        assert (img.get_attribute("alt") or "").strip()
    for svg in page.locator("svg[role=img]").all():
        assert svg.locator("title").count() >= 1
    shot(page, artifacts, "03-patient", readme=True)
    page.get_by_role("link", name="Model card").last.click()
    expect(page.get_by_role("heading", name="Model card")).to_be_visible()
    expect(page.locator("main")).to_contain_text(re.compile("not validated for clinical use",
                                                            re.I))
    shot(page, artifacts, "04-model-card")


# -- flow 3 -----------------------------------------------------------------------------


def _loaded(page: Page, selector: str) -> bool:
    return bool(page.eval_on_selector(selector, "img => img.complete && img.naturalWidth > 0"))


def test_3_scroll_slices_with_overlay(page: Page, live: LiveService, artifacts: Path) -> None:
    login(page, live, CLINICIAN)
    pid, _ = featured(live)
    page.goto(f"{live.url}/dashboard/patients/{pid}#imaging")
    viewer = page.locator("#viewer")
    overlay_toggle = page.get_by_label("Show saliency overlay")
    expect(overlay_toggle).to_be_checked()
    expect(page.locator("#saliency")).to_be_visible()
    n = int(viewer.get_attribute("data-slices") or 0)
    assert n == 8
    slider = page.get_by_role("slider", name="Slice")
    slider.focus()
    seen_anatomy, seen_overlay = set(), set()
    page.keyboard.press("Home")
    for k in range(n):
        expect(page.locator("#slice-pos")).to_have_text(f"Slice {k + 1} of {n}")
        page.wait_for_function("() => [...document.querySelectorAll('#viewer img')]"
                               ".every(i => i.complete && i.naturalWidth > 0)")
        seen_anatomy.add(page.get_attribute("#anatomy", "src"))
        seen_overlay.add(page.get_attribute("#saliency", "src"))
        assert f"slice {k + 1} of {n}" in (page.get_attribute("#anatomy", "alt") or "").lower()
        if k == n // 2:
            shot(page, artifacts, "05-viewer-overlay")
        page.keyboard.press("ArrowRight")
    assert len(seen_anatomy) == n and len(seen_overlay) > 1
    for selector in ("#anatomy", "#model-input", "#saliency"):
        assert _loaded(page, selector)
    # Window presets re-render the stored slice on the server.
    page.get_by_label("Lung (W 1500 / L −600)").check()
    expect(page.locator("#anatomy")).to_have_attribute("src", re.compile(r"window=lung"))
    expect(page.locator("#anatomy")).to_have_attribute("alt", re.compile("lung window"))
    # The overlay toggles off and on without leaving the slice.
    overlay_toggle.uncheck()
    expect(page.locator("#saliency")).to_be_hidden()
    overlay_toggle.check()
    expect(page.locator("#saliency")).to_be_visible()
    # The top-attribution shortcut jumps to a slice.
    page.locator("button[data-model-slice]").first.click()
    expect(page.locator("#slice-pos")).to_have_text(re.compile(rf"Slice \d+ of {n}"))
    shot(page, artifacts, "06-viewer-lung")


# -- flow 4 -----------------------------------------------------------------------------


def test_4_feedback_is_stored(page: Page, live: LiveService, artifacts: Path) -> None:
    login(page, live, CLINICIAN)
    pid, _ = featured(live)
    page.goto(f"{live.url}/dashboard/patients/{pid}#feedback")
    form = page.locator("form.feedback")
    form.get_by_role("radio", name="Disagree").check()
    form.get_by_label(re.compile("^Reason")).select_option("risk-too-high")
    form.get_by_label("Comment").fill("Recovering well; mobilising on the ward.")
    form.get_by_role("button", name="Submit feedback").click()
    expect(page.locator("#feedback p.ok")).to_contain_text("feedback was saved")
    expect(page.locator(".feedback-list li").first).to_contain_text(
        "Risk seems too high for this patient")
    shot(page, artifacts, "07-feedback")
    with live.session() as session:
        latest = session.scalars(select(PredictionRow).where(PredictionRow.patient_id == pid)
                                 .order_by(PredictionRow.created_at.desc())).first()
        rows = session.scalars(select(FeedbackRow).where(
            FeedbackRow.prediction_id == latest.id)).all()
    assert len(rows) == 1
    row = rows[0]
    assert row.channel == "dashboard" and row.outcome == "overridden"
    assert row.override_reason is not None and row.override_reason["code"] == "risk-too-high"
    assert row.user_comment == "Recovering well; mobilising on the ward."
    assert row.recorded_by == CLINICIAN[0]
    # Agreeing is CDS Hooks' "accepted", with no override reason.
    form.get_by_role("radio", name="Agree", exact=True).check()
    form.get_by_role("button", name="Submit feedback").click()
    expect(page.locator(".feedback-list li")).to_have_count(2)
    with live.session() as session:
        outcomes = sorted(r.outcome for r in session.scalars(select(FeedbackRow).where(
            FeedbackRow.prediction_id == latest.id)))
    assert outcomes == ["accepted", "overridden"]


# -- flow 5 -----------------------------------------------------------------------------


def test_5_smart_ehr_launch(page: Page, live: LiveService, artifacts: Path) -> None:
    pid, mrn = featured(live)
    # The test plays the EHR: it mints a launch context for the patient in view.
    launch = smart_launch.issue_launch(live.app.state.local_issuer, pid)
    config = httpx.get(f"{live.url}/.well-known/smart-configuration").json()
    assert config["authorization_endpoint"].endswith("/auth/authorize")
    assert "launch-ehr" in config["capabilities"] and "S256" in config[
        "code_challenge_methods_supported"]
    codes: list[str] = []
    page.on("request", lambda r: codes.extend(parse_qs(urlsplit(r.url).query).get("code", []))
            if "/dashboard/callback" in r.url else None)
    authorize: list[str] = []
    page.on("request", lambda r: authorize.append(r.url) if "/auth/authorize?" in r.url
            else None)
    page.goto(f"{live.url}/dashboard/launch?iss={quote(live.url + '/fhir')}"
              f"&launch={quote(launch)}")
    expect(page).to_have_url(re.compile(r"/auth/authorize\?"))
    query = parse_qs(urlsplit(authorize[0]).query)
    assert query["code_challenge_method"] == ["S256"] and query["state"][0]
    assert query["launch"] == [launch] and query["aud"] == [f"{live.url}/fhir"]
    # Nothing about the patient is shown before sign-in.
    assert mrn not in page.content()
    expect(page.get_by_role("heading", name="Open clinfuse from your EHR")).to_be_visible()
    shot(page, artifacts, "08-smart-consent")
    page.get_by_label("User name").fill(CLINICIAN[0])
    page.get_by_label("Password").fill(CLINICIAN[1])
    page.get_by_role("button", name="Sign in and allow").click()
    expect(page).to_have_url(f"{live.url}/dashboard/patients/{pid}")
    expect(page.get_by_role("heading", name=f"Patient {mrn}")).to_be_visible()
    shot(page, artifacts, "09-smart-landed")
    cookie = next(c for c in page.context.cookies() if c["name"] == "clinfuse_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    # The code was single-use: redeeming it again (even with a guess at the verifier) fails.
    assert len(codes) == 1
    again = httpx.post(f"{live.url}/auth/token", data={
        "grant_type": "authorization_code", "code": codes[0],
        "redirect_uri": f"{live.url}/dashboard/callback",
        "client_id": smart_launch.DASHBOARD_CLIENT_ID,
        "code_verifier": smart_launch.new_code_verifier()})
    assert again.status_code in (400, 401) and again.json()["error"] == "invalid_grant"


# -- flow 6 -----------------------------------------------------------------------------


def test_6_compliance_runs_an_audit(page: Page, live: LiveService, artifacts: Path) -> None:
    # An audit runs its bootstrap inside the request: seconds, more on a busy machine.
    page.set_default_timeout(180_000)
    login(page, live, COMPLIANCE)
    expect(page).to_have_url(re.compile(r"/dashboard/audits$"))
    expect(page.get_by_role("link", name="Worklist")).to_have_count(0)
    shot(page, artifacts, "10-audits-empty")
    # Two attributes whose groups are large enough in the small cohort to be reported.
    for label in ("Race", "Ethnicity"):
        page.get_by_label(label, exact=True).uncheck()
    page.get_by_label("Smallest reported group").fill("20")
    page.get_by_role("button", name="Run audit").click()
    expect(page).to_have_url(re.compile(r"/dashboard/audits/[0-9a-f]{32}$"), timeout=180_000)
    first_id = page.url.rsplit("/", 1)[-1]
    expect(page.get_by_test_id("audited")).to_have_text(str(len(live.demo.patients)))
    report = page.frame_locator("iframe.report")
    expect(report.locator("h1").first).to_contain_text("Fairness audit")
    expect(report.locator("img").first).to_be_visible()
    shot(page, artifacts, "11-audit-report", readme=True, height=1900)
    pdf = page.request.get(f"{live.url}/dashboard/audits/{first_id}/report.pdf")
    assert pdf.status == 200 and pdf.body()[:4] == b"%PDF"
    doc = page.request.get(f"{live.url}/dashboard/audits/{first_id}/audit.json").json()
    assert doc["audit_id"] == first_id and doc["results"]["sensitive"] == ["sex", "age_band"]
    # The report page itself is served sandboxed: no script, no same-origin access.
    direct = page.request.get(f"{live.url}/dashboard/audits/{first_id}/report.html")
    assert direct.headers["content-security-policy"].startswith("sandbox")
    page.goto(f"{live.url}/dashboard/audits/{first_id}/report.html")
    shot(page, artifacts, "11b-audit-report-full")
    # Every attribute at the default minimum: the small groups stay suppressed.
    page.goto(f"{live.url}/dashboard/audits")
    page.get_by_role("button", name="Run audit").click()
    expect(page).to_have_url(re.compile(r"/dashboard/audits/[0-9a-f]{32}$"), timeout=180_000)
    report = page.frame_locator("iframe.report")
    expect(report.get_by_text(re.compile("insufficient data", re.I)).first).to_be_visible()
    page.get_by_role("button", name=re.compile("Compare with the previous audit")).click()
    expect(page.get_by_role("heading", name="What changed between two audits")).to_be_visible()
    expect(page.locator("main")).to_contain_text("sensitive")
    shot(page, artifacts, "12-audit-compare")
    page.goto(f"{live.url}/dashboard/audits")
    expect(page.locator("table.audits tbody tr")).to_have_count(2)
    shot(page, artifacts, "13-audit-list")


# -- flow 7 -----------------------------------------------------------------------------


def test_7_compliance_cannot_open_a_patient(page: Page, live: LiveService,
                                            artifacts: Path) -> None:
    login(page, live, COMPLIANCE)
    pid, mrn = featured(live)
    response = page.goto(f"{live.url}/dashboard/patients/{pid}")
    assert response is not None and response.status == 403
    expect(page.get_by_role("heading", name="Not available for your role")).to_be_visible()
    assert mrn not in page.content()
    shot(page, artifacts, "14-compliance-403")
    for path in (f"/dashboard/patients/{pid}/model-input/0.png", "/dashboard/worklist"):
        assert page.request.get(live.url + path).status == 403
    # The access log shows the refused attempt, with the patient pseudonymised.
    page.goto(f"{live.url}/dashboard/access-log")
    expect(page.get_by_test_id("chain")).to_contain_text("Intact")
    content = page.content()
    assert pid not in content and mrn not in content
    assert re.search(r"P-[0-9a-f]{16}", content)
    expect(page.locator("tbody tr").filter(has_text="compliance").filter(
        has_text="403").first).to_be_visible()
    shot(page, artifacts, "15-access-log")


def test_keyboard_skip_link_and_focus(page: Page, live: LiveService) -> None:
    login(page, live, CLINICIAN)
    page.keyboard.press("Tab")
    expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "main"
    # Column headers are links: sortable from the keyboard.
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.tagName") in ("SELECT", "A", "BUTTON")
