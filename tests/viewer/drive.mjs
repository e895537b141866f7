// Drives one headless Chromium through OHIF for tests/viewer/ohif.py: one JSON request per stdin
// line, one JSON reply per stdout line (diagnostics go to stderr).
//   {"cmd": "view", "url": ".../viewer?StudyInstanceUIDs=...", "timeout_ms": N,
//    "targets": [{"sop": UID|null, "modality": "SR", "screenshot": PATH, "drawn": BOOL}, ...]}
//     -> {"results": [{"errors": [...], "texts": [...], "annotations": [...], "console": [...],
//         "shown": {...}, "viewport": {"mean": .., "max": .., "lit": ..}, "seconds": s}, ...]}
//   The study is opened once; each target series is then double-clicked in turn.
//   {"cmd": "quit"}
// puppeteer-core comes from $PLEURA_VIEWER_DIR/node_modules (bash .ci/setup: npm ci); the browser is
// Debian's $CHROMIUM (WebGL on SwiftShader) with a fresh profile in $PROFILE_DIR. Only 127.0.0.1.
import { createRequire } from 'node:module';
import path from 'node:path';
import readline from 'node:readline';

const require = createRequire(path.join(process.env.PLEURA_VIEWER_DIR, 'package.json'));
const puppeteer = require('puppeteer-core');

const WIDTH = 1440;
const HEIGHT = 900;
const SETTLED_MS = 1000;
// Lines on screen that mean OHIF failed to show something (its error boundary says "Something
// went wrong"; its details dialog and some viewports print the exception).
const ERROR_PATTERNS = [/something went wrong/i, /\b(TypeError|ReferenceError|RangeError|SyntaxError)\b/,
  /\bError:/, /failed to load/i, /(could not|cannot|unable to) (be )?(display|load|render)/i];

const log = (...args) => process.stderr.write(`[drive ${new Date().toISOString()}] ${args.join(' ')}\n`);
const reply = (obj) => process.stdout.write(`${JSON.stringify(obj)}\n`);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

const browser = await puppeteer.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  userDataDir: process.env.PROFILE_DIR,
  defaultViewport: { width: WIDTH, height: HEIGHT },
  protocolTimeout: 180000,
  args: [
    '--no-sandbox', '--disable-gpu', '--enable-unsafe-swiftshader', '--disable-dev-shm-usage',
    '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run',
    '--disable-quic', `--window-size=${WIDTH},${HEIGHT}`,
  ],
});
log('chromium', await browser.version());

// In the page, before OHIF starts: no first-run dialog or tour (OHIF's own storage keys, from its
// build), and a record of every notification OHIF shows.
function prepare() {
  sessionStorage.setItem('investigationalUseDialog', 'hidden');
  localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));
  window.__pleura = { notifications: [] };
  const hook = setInterval(() => {
    const service = window.services && window.services.uiNotificationService;
    if (!service || service.__pleuraHooked) return;
    const show = service.show.bind(service);
    service.show = (notification) => {
      const n = notification || {};
      const message = n.message && n.message.message ? n.message.message : n.message;
      window.__pleura.notifications.push({ type: String(n.type || ''), title: String(n.title || ''),
        message: typeof message === 'string' ? message : '' });
      return show(notification);
    };
    service.__pleuraHooked = true;
    clearInterval(hook);
  }, 20);
}

// In the page: the study's display sets, what each viewport shows and, for cornerstone viewports,
// the image it has loaded.
function displaySets() {
  const services = window.services;
  const grid = services && services.viewportGridService;
  if (!grid || !services.displaySetService || typeof grid.serviceImplementation?._getState !== 'function') return null;
  const all = services.displaySetService.getActiveDisplaySets();
  const sets = all.map((ds) => {
    const instances = ds.instances || (ds.instance ? [ds.instance] : []);
    return {
      uid: ds.displaySetInstanceUID, modality: ds.Modality || '', sopClassUid: ds.SOPClassUID || '',
      studyUid: ds.StudyInstanceUID || '', seriesUid: ds.SeriesInstanceUID || '',
      seriesNumber: Number(ds.SeriesNumber ?? 0), instanceNumber: Number(instances[0]?.InstanceNumber ?? 0),
      sops: instances.map((i) => i.SOPInstanceUID), description: ds.SeriesDescription || '',
      // the instance OHIF shows for the series (for an SR series: the newest one)
      sop: ds.SOPInstanceUID || (instances[0] ? instances[0].SOPInstanceUID : ''),
      thumbnail: !!document.getElementById(`thumbnail-${ds.displaySetInstanceUID}`),
    };
  });
  const viewports = [...grid.getState().viewports.values()].map((v) => {
    const shown = v.displaySetInstanceUIDs || [];
    let image = null;
    const cs = services.cornerstoneViewportService?.getCornerstoneViewport?.(v.viewportId);
    if (cs && typeof cs.getCurrentImageId === 'function') {
      const imageId = cs.getCurrentImageId() || '';
      const owners = all.filter((ds) => (ds.imageIds || []).includes(imageId)).map((ds) => ds.displaySetInstanceUID);
      image = { loaded: !!cs.csImage, owners };
    }
    return { id: v.viewportId, displaySets: shown, image };
  });
  return { sets, viewports };
}

// In the page: visible lines of text (DOM, and SVG text drawn over images), the error texts among
// them, OHIF's error and warning notifications, and how lit the viewport's canvas is.
function screen(patterns) {
  const visible = (el) => {
    const box = el.getBoundingClientRect();
    const style = window.getComputedStyle(el);
    return box.width > 0 && box.height > 0 && style.visibility !== 'hidden' && style.display !== 'none';
  };
  const dom = document.body.innerText.split('\n').map((t) => t.trim()).filter(Boolean);
  const annotations = [];
  for (const text of document.querySelectorAll('svg text')) {
    if (!visible(text)) continue;
    const spans = [...text.querySelectorAll('tspan')];
    for (const line of spans.length ? spans.map((s) => s.textContent) : [text.textContent]) {
      if (line && line.trim()) annotations.push(line.trim());
    }
  }
  const regexes = patterns.map(([source, flags]) => new RegExp(source, flags));
  const errors = dom.filter((line) => regexes.some((r) => r.test(line)));
  for (const n of window.__pleura?.notifications || []) {
    if (n.type === 'error' || n.type === 'warning') errors.push(`${n.type}: ${n.title} ${n.message}`.trim());
  }
  let viewport = null;
  const canvas = document.querySelector('canvas.cornerstone-canvas');
  const context = canvas && canvas.width && canvas.height ? canvas.getContext('2d') : null;
  if (context) {
    const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
    let sum = 0; let max = 0; let lit = 0;
    for (let i = 0; i < data.length; i += 16) { // every fourth pixel
      const v = Math.max(data[i], data[i + 1], data[i + 2]);
      sum += v; if (v > max) max = v; if (v > 16) lit += 1;
    }
    const n = data.length / 16;
    viewport = { mean: sum / n, max, lit: lit / n, width: canvas.width, height: canvas.height };
  }
  const loading = !!document.querySelector('.loading-indicator, [data-cy="loading-indicator"]');
  return { dom, annotations, errors, viewport, loading };
}

// Opens OHIF's error details ("Show Details") so the exception's text is on screen, then closes them.
async function errorDetails(page) {
  const details = [];
  for (const button of await page.$$('button')) {
    const label = await button.evaluate((b) => b.innerText).catch(() => '');
    if (!/show details/i.test(label)) continue;
    await button.click().catch(() => {});
    await sleep(300);
    const text = await page.evaluate(() => [...document.querySelectorAll('[role="dialog"]')]
      .map((d) => d.innerText).join('\n')).catch(() => '');
    details.push(...text.split('\n').map((t) => t.trim()).filter(Boolean));
    await page.keyboard.press('Escape').catch(() => {});
    await sleep(200);
  }
  return details;
}

// The viewport's canvas shows an image (as ViewResult.image_shown in tests/viewer/ohif.py decides).
const drawn = (viewport) => !!viewport && viewport.lit > 0.05 && viewport.max > 64;

// Waits until the screen (text, SVG text, error texts, canvas brightness) has not changed for
// SETTLED_MS with nothing loading and, when the viewport holds an image (needsImage), with that
// image drawn: a loaded machine can leave the canvas black for longer than SETTLED_MS before it
// draws. Marked late if the deadline came first.
async function settle(page, patterns, deadline, needsImage = false) {
  let key = '';
  let since = Date.now();
  for (;;) {
    const now = await page.evaluate(screen, patterns);
    const k = JSON.stringify([now.dom, now.annotations, now.errors, now.viewport, now.loading]);
    if (k !== key) { key = k; since = Date.now(); }
    const ready = !now.loading && (!needsImage || drawn(now.viewport));
    if (Date.now() - since >= SETTLED_MS && ready) return now;
    if (Date.now() > deadline) return { ...now, late: true };
    await sleep(250);
  }
}

// Polls fn(...args) in the page until it is true (true), an error not in seenErrors is on screen
// or the deadline passes (false).
async function until(page, fn, args, deadline, patterns, seenErrors) {
  for (;;) {
    if (await page.evaluate(fn, ...args).catch(() => false)) return true;
    const now = await page.evaluate(screen, patterns).catch(() => ({ errors: [] }));
    if (now.errors.some((e) => !seenErrors.has(e)) || Date.now() > deadline) return false;
    await sleep(200);
  }
}

// In the page: the SR display set's measurements as OHIF parsed them, and the image the viewport shows.
function srState(uid) {
  const ds = window.services.displaySetService.getDisplaySetByUID(uid);
  const measurements = (ds && ds.measurements) || [];
  const current = [];
  for (const v of window.services.viewportGridService.getState().viewports.values()) {
    if (!(v.displaySetInstanceUIDs || []).includes(uid)) continue;
    const cs = window.services.cornerstoneViewportService.getCornerstoneViewport(v.viewportId);
    const imageId = cs && typeof cs.getCurrentImageId === 'function' ? cs.getCurrentImageId() : null;
    if (imageId) current.push(imageId);
  }
  return {
    measurements: measurements.map((m) => ({ imageId: m.imageId || '', labels: m.labels || [],
      graphicType: m.graphicType || '', sop: m.ReferencedSOPInstanceUID || '' })),
    images: [...new Set(measurements.map((m) => m.imageId).filter(Boolean))],
    current,
  };
}

// Shows one series of the open study (double-click on its thumbnail) and reads the screen; for a
// TID 1500 SR whose findings lie on several images, steps through them with the viewport's arrows.
async function showSeries(page, state, target, patterns, deadline) {
  const errors = [];
  const before = await page.evaluate(screen, patterns);
  const seenErrors = new Set(before.errors);
  const candidates = state.sets.filter((s) => (target.sop ? s.sops.includes(target.sop) : s.modality === target.modality));
  candidates.sort((a, b) => (a.seriesNumber - b.seriesNumber) || (a.instanceNumber - b.instanceNumber));
  const chosen = candidates[candidates.length - 1];
  const shown = { target: chosen || null };
  if (!chosen) {
    errors.push(`driver: no series with ${target.sop || target.modality} among ${state.sets.map((s) => s.modality)}`);
    await page.screenshot({ path: target.screenshot });
    return { errors, dom: before.dom, annotations: [], viewport: null, shown };
  }
  // As a radiologist does: double-click the series' thumbnail to show it in the viewport.
  await page.click(`[id="thumbnail-${chosen.uid}"]`, { count: 2, delay: 40 });
  // Shown: a viewport holds the series and, if it is an image, has loaded it (an SR's viewport
  // loads the image its findings are drawn on; a text SR has no image to wait for).
  const ok = await until(page, (uid, modality) => {
    const viewport = window.__pleuraDisplaySets()?.viewports.find((v) => v.displaySets.includes(uid));
    if (!viewport) return false;
    if (modality === 'SR') return !viewport.image || viewport.image.loaded;
    return !!viewport.image && viewport.image.loaded && viewport.image.owners.includes(uid);
  }, [chosen.uid, chosen.modality], deadline, patterns, seenErrors);
  if (!ok) errors.push('driver: the series was not shown in a viewport after a double-click');
  // an image series, or an SR whose findings are on an image: wait for that image to be drawn
  const needsImage = await page.evaluate((uid) => {
    const viewport = window.__pleuraDisplaySets()?.viewports.find((v) => v.displaySets.includes(uid));
    return !!(viewport && viewport.image);
  }, chosen.uid).then((image) => image && target.drawn !== false).catch(() => false);
  let now = await settle(page, patterns, deadline, needsImage);
  if (now.late) errors.push('driver: the screen did not settle in time');
  shown.viewports = (await page.evaluate(() => window.__pleuraDisplaySets())).viewports;
  await page.screenshot({ path: target.screenshot });
  const annotations = [...now.annotations];
  const viewport = now.viewport;
  let screenErrors = [...now.errors];
  if (chosen.modality === 'SR') {
    let sr = await page.evaluate(srState, chosen.uid).catch(() => null);
    shown.measurements = sr ? sr.measurements : null;
    // Findings on other images: the viewport's right arrow selects the next measurement.
    const visited = new Set(sr ? sr.current : []);
    for (let step = 1; sr && step < sr.measurements.length && sr.images.some((i) => !visited.has(i)); step += 1) {
      const arrow = await page.$('[data-cy="viewport-action-arrows-right"]');
      if (!arrow) { errors.push('driver: findings on several images but no arrows to reach them'); break; }
      await arrow.click();
      now = await settle(page, patterns, deadline, needsImage);
      sr = await page.evaluate(srState, chosen.uid);
      const fresh = sr.current.filter((i) => !visited.has(i));
      if (fresh.length) {
        fresh.forEach((i) => visited.add(i));
        annotations.push(...now.annotations);
        screenErrors.push(...now.errors);
        await page.screenshot({ path: target.screenshot.replace(/\.png$/, `-image${visited.size}.png`) });
      }
    }
    shown.imagesVisited = visited.size;
    // SOP Instance UIDs of the images shown (WADO-RS image ids name them)
    shown.visitedSops = [...visited].map((i) => (/\/instances\/([^/]+)\/frames\//.exec(i) || [])[1]).filter(Boolean);
  }
  screenErrors = screenErrors.filter((e) => !seenErrors.has(e));
  if (screenErrors.length) screenErrors.push(...await errorDetails(page));
  return { errors: [...screenErrors, ...errors], dom: now.dom, annotations, viewport, shown };
}

async function view(req) {
  const started = Date.now();
  const deadline = started + req.timeout_ms;
  const page = await browser.newPage();
  const consoleLines = [];
  page.on('console', (m) => { if (m.type() === 'error') consoleLines.push(`console.error: ${m.text().slice(0, 500)}`); });
  page.on('pageerror', (e) => consoleLines.push(`pageerror: ${String(e.message || e).slice(0, 500)}`));
  await page.evaluateOnNewDocument(`(${prepare})(); window.__pleuraDisplaySets = ${displaySets};`);
  const patterns = ERROR_PATTERNS.map((r) => [r.source, r.flags]);
  const results = [];
  try {
    await page.goto(req.url, { waitUntil: 'domcontentloaded', timeout: req.timeout_ms });
    // The study's series, each with its thumbnail in the study browser, and the hanging
    // protocol's first image up (a double-click while it still loads can leave that image's
    // window/level on the next one).
    const state = await (await page.waitForFunction(() => {
      const s = window.__pleuraDisplaySets();
      const first = s && s.viewports.find((v) => v.displaySets.length);
      return s && s.sets.length && s.sets.every((d) => d.thumbnail) && first && (!first.image || first.image.loaded)
        ? s : null;
    }, { timeout: Math.max(1000, deadline - Date.now()), polling: 200 })).jsonValue();
    await settle(page, patterns, deadline);
    for (const target of req.targets) {
      const t0 = Date.now();
      const c0 = consoleLines.length;
      const r = await showSeries(page, state, target, patterns, deadline);
      results.push({ errors: [...new Set(r.errors)], texts: [...r.dom, ...r.annotations], annotations: r.annotations,
        console: consoleLines.slice(c0), shown: { displaySets: state.sets, ...r.shown }, viewport: r.viewport,
        seconds: (Date.now() - (results.length ? t0 : started)) / 1000 });
    }
  } catch (e) {
    const now = await page.evaluate(screen, patterns).catch(() => ({ dom: [], annotations: [], errors: [], viewport: null }));
    for (const target of req.targets.slice(results.length)) {
      await page.screenshot({ path: target.screenshot }).catch(() => {});
      results.push({ errors: [...new Set([...now.errors, `driver: ${e.message.split('\n')[0]}`])],
        texts: [...now.dom, ...now.annotations], annotations: now.annotations, console: consoleLines.slice(),
        shown: {}, viewport: now.viewport, seconds: (Date.now() - started) / 1000 });
    }
  } finally {
    await page.close().catch(() => {});
  }
  return { results };
}

reply({ ready: true, chromium: await browser.version() });
for await (const line of readline.createInterface({ input: process.stdin })) {
  if (!line.trim()) continue;
  let req;
  try {
    req = JSON.parse(line);
  } catch (e) {
    reply({ fatal: `bad request: ${e.message}` });
    continue;
  }
  if (req.cmd === 'quit') break;
  try {
    reply(req.cmd === 'view' ? await view(req) : { fatal: `unknown command ${req.cmd}` });
  } catch (e) {
    reply({ fatal: String(e.stack || e) });
  }
}
await browser.close();
process.exit(0);
