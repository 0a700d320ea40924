// Drives the upload page in Debian's Chromium with playwright-core, for the end-to-end test
// e2e/tests/e2e/browser.rs, which starts the real API and worker and checks on the server
// what this script reports.
//
//   node upload_page.mjs '<options as JSON>'
//
// Options:
//   scenario    "uploads" (default: the options below) or "link": `url` is an upload link
//               (`/#token=…`) through which `plain` is uploaded, and `badUrl` one with a
//               forged token, which must be refused; or "parallel": `plain` is large enough
//               for parallel partial uploads, and `concat` lists the Upload-Concat headers
//               of the POSTs
//   url         the page (`http://127.0.0.1:PORT/`)
//   plain       a file that uploads straight through
//   resumed     a file whose upload is cut by a page reload part-way (the upload is slowed by
//               Chromium's network emulation so that the reload lands in the middle), then
//               chosen again with `plain` after the reload: it must resume, not restart
//   refused     a file the server refuses (larger than its limit)
//   artifacts   the directory for the screenshots
//   throttle    bytes per second for the slowed upload (default 1 MiB/s)
//   cutAt       the percentage of `resumed` after which the page is reloaded (default 40);
//               before that, at 15 %, the page's Pause button stops it and Resume goes on
//   timeoutMs   for each wait (default 60000)
//
// Output: one JSON line on stdout:
//   {"ok":true, "items":[{name, state, uploadId, md5, size, href, message}],
//    "pause":{"percentAtPause", "patchOffsetAfterResume"},
//    "resume":{"percentAtReload", "headOffsets":[...], "firstPatchOffset"},
//    "refusal":{name, state, message}, "recent":{rows:[[...]], message},
//    "requests":[{method, url, status, offset}], "consoleErrors":[...], "screenshots":[...]}
// or {"ok":false, "error":..., "step":..., ...what was gathered}. Exit 0 / 1; 2 when it could not
// run at all (playwright-core not installed, no Chromium).
//
// playwright-core is looked up in STITCH_TEST_UI_NODE_MODULES (where `cargo xtask test`
// installs api/ui/package-lock.json), else beside this file. It never downloads a browser:
// it starts /usr/bin/chromium (or STITCH_TEST_CHROMIUM).

import { createRequire } from 'node:module'
import { mkdirSync } from 'node:fs'
import path from 'node:path'

const MiB = 1024 * 1024
const CHROMIUM = process.env.STITCH_TEST_CHROMIUM || '/usr/bin/chromium'

function finish(line, code) {
  process.stdout.write(`${JSON.stringify(line)}\n`, () => process.exit(code))
}

function loadPlaywright() {
  const modules = process.env.STITCH_TEST_UI_NODE_MODULES
  const from = modules ? path.join(path.dirname(modules), 'package.json') : import.meta.url
  try {
    return createRequire(from)('playwright-core')
  } catch (e) {
    finish(
      {
        ok: false,
        setup: true,
        error:
          `playwright-core cannot be loaded (${e.message}); ` +
          '`cargo xtask test` installs it and sets STITCH_TEST_UI_NODE_MODULES',
      },
      2,
    )
    return null
  }
}

const options = JSON.parse(process.argv[2] || '{}')
const timeout = options.timeoutMs || 60000
const report = {
  ok: false,
  items: [],
  pause: null,
  concat: [],
  resume: {},
  refusal: null,
  recent: null,
  requests: [],
  consoleErrors: [],
  screenshots: [],
}
let step = 'start'

/** The upload item of the page for the file named `name`. */
const itemFor = (page, name) =>
  page.locator('#queue > li.upload').filter({ has: page.locator('.name', { hasText: name }) }).first()

/** What the page shows of one file's upload. */
async function readItem(page, name) {
  const item = itemFor(page, name)
  return item.evaluate((li) => ({
    name: li.querySelector('.name').textContent,
    state: li.dataset.state,
    stateText: li.querySelector('.state').textContent,
    uploadId: li.dataset.uploadId || null,
    md5: li.querySelector('.result-md5').textContent || null,
    size: li.querySelector('.result-size').textContent || null,
    href: li.querySelector('.result-link').href || null,
    message: li.querySelector('.message').hidden ? null : li.querySelector('.message').textContent,
    percent: Number(li.querySelector('progress').value),
  }))
}

async function shoot(page, name) {
  const file = path.join(options.artifacts, name)
  await page.screenshot({ path: file, fullPage: true })
  report.screenshots.push(file)
}

async function waitForState(page, name, states) {
  await page.waitForFunction(
    ([n, wanted]) => {
      for (const li of document.querySelectorAll('#queue > li.upload')) {
        if (li.querySelector('.name').textContent === n) return wanted.includes(li.dataset.state)
      }
      return false
    },
    [name, states],
    { timeout, polling: 100 },
  )
}

/**
 * An upload link (`url` ends in `#token=…`): one file goes up with the token alone, and
 * the same page with a forged token (`badUrl`) shows the refusal.
 */
async function runLink(page, ready) {
  step = 'upload through an upload link'
  await page.goto(options.url)
  await ready()
  const name = path.basename(options.plain)
  await page.setInputFiles('#files', options.plain)
  await waitForState(page, name, ['completed', 'failed', 'refused', 'error'])
  report.items = [await readItem(page, name)]
  await page
    .waitForFunction(() => document.querySelectorAll('#recent-rows tr').length >= 1, null, {
      timeout: 10000,
      polling: 100,
    })
    .catch(() => {})
  report.recent = await readRecent(page)
  report.authNote = await page.locator('#auth-note').textContent()
  await shoot(page, 'link.png')

  step = 'a forged upload link'
  // Another document, so that the page reads the new fragment.
  await page.goto('about:blank')
  await page.goto(options.badUrl)
  await ready()
  await page.setInputFiles('#files', options.plain)
  await waitForState(page, name, ['refused', 'error', 'completed', 'failed'])
  const refused = await readItem(page, name)
  report.refusal = { name: refused.name, state: refused.state, message: refused.message }
  await shoot(page, 'link-refused.png')
}

/** A file large enough for parallel partial uploads joined by a concatenation. */
async function runParallel(page, ready) {
  step = 'upload a large file in parallel parts'
  page.on('request', (request) => {
    const concat = request.headers()['upload-concat']
    if (request.method() === 'POST' && concat) report.concat.push(concat)
  })
  await page.goto(options.url)
  await ready()
  const name = path.basename(options.plain)
  await page.setInputFiles('#files', options.plain)
  await waitForState(page, name, ['completed', 'failed', 'refused', 'error'])
  report.items = [await readItem(page, name)]
}

async function readRecent(page) {
  return page.evaluate(() => ({
    rows: Array.from(document.querySelectorAll('#recent-rows tr')).map((tr) =>
      Array.from(tr.cells).map((td) => td.textContent.trim()),
    ),
    message: document.getElementById('recent-message').textContent,
  }))
}

async function run(chromium) {
  mkdirSync(options.artifacts, { recursive: true })
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking'],
  })
  try {
    const context = await browser.newContext({ viewport: { width: 1100, height: 820 } })
    const page = await context.newPage()
    page.setDefaultTimeout(timeout)
    page.on('console', (msg) => {
      if (msg.type() === 'error') report.consoleErrors.push(msg.text())
    })
    page.on('pageerror', (err) => report.consoleErrors.push(`page error: ${err.message}`))
    // PATCHes when they are sent (one cut by a pause or a reload never gets an answer), with
    // the offset they start at; HEADs when answered, with the offset the server reported.
    const files = (url) => new URL(url).pathname.startsWith('/files')
    page.on('request', (request) => {
      if (request.method() !== 'PATCH' || !files(request.url())) return
      report.requests.push({
        method: 'PATCH',
        url: new URL(request.url()).pathname,
        offset: Number(request.headers()['upload-offset']),
      })
    })
    page.on('response', (response) => {
      const request = response.request()
      if (request.method() === 'PATCH' || !files(request.url())) return
      const offset = response.headers()['upload-offset']
      report.requests.push({
        method: request.method(),
        url: new URL(request.url()).pathname,
        status: response.status(),
        offset: offset != null ? Number(offset) : null,
      })
    })
    const ready = () => page.waitForSelector('body[data-ready="true"]', { timeout })
    if (options.scenario === 'link' || options.scenario === 'parallel') {
      await (options.scenario === 'link' ? runLink : runParallel)(page, ready)
      report.ok = true
      return
    }

    step = 'open the page'
    await page.goto(options.url)
    await ready()
    const plainName = path.basename(options.plain)
    const resumedName = path.basename(options.resumed)

    step = 'upload a file slowly and reload the page part-way'
    const cdp = await context.newCDPSession(page)
    await cdp.send('Network.enable')
    const throttle = (bytesPerSecond) =>
      cdp.send('Network.emulateNetworkConditions', {
        offline: false,
        latency: 0,
        downloadThroughput: -1,
        uploadThroughput: bytesPerSecond,
      })
    await throttle(options.throttle || MiB)
    await page.setInputFiles('#files', options.resumed)
    const reached = (percent) =>
      page.waitForFunction(
        ([n, cut]) => {
          for (const li of document.querySelectorAll('#queue > li.upload')) {
            if (li.querySelector('.name').textContent === n) return li.querySelector('progress').value >= cut
          }
          return false
        },
        [resumedName, percent],
        { timeout, polling: 50 },
      )

    step = 'pause and resume with the buttons'
    await reached(15)
    await itemFor(page, resumedName).getByRole('button', { name: 'Pause' }).click()
    await waitForState(page, resumedName, ['paused'])
    report.pause = { percentAtPause: (await readItem(page, resumedName)).percent }
    const requestsBeforeResume = report.requests.length
    await page.waitForTimeout(500)
    await itemFor(page, resumedName).getByRole('button', { name: 'Resume' }).click()
    await reached(report.pause.percentAtPause + 5)
    const resumedPatch = report.requests.slice(requestsBeforeResume).find((r) => r.method === 'PATCH')
    report.pause.patchOffsetAfterResume = resumedPatch ? resumedPatch.offset : null

    step = 'reload the page part-way'
    await reached(options.cutAt || 40)
    report.resume.percentAtReload = (await readItem(page, resumedName)).percent
    await shoot(page, 'uploading.png')
    const requestsBeforeReload = report.requests.length
    await page.reload()
    await ready()
    await throttle(-1)

    step = 'choose both files again: one resumes, one starts'
    await page.setInputFiles('#files', [options.plain, options.resumed])
    await waitForState(page, resumedName, ['completed', 'failed', 'refused', 'error'])
    await waitForState(page, plainName, ['completed', 'failed', 'refused', 'error'])
    const after = report.requests.slice(requestsBeforeReload)
    report.resume.headOffsets = after.filter((r) => r.method === 'HEAD').map((r) => r.offset)
    report.items = [await readItem(page, plainName), await readItem(page, resumedName)]
    const resumedId = report.items[1].uploadId
    const firstPatch = after.find((r) => r.method === 'PATCH' && resumedId && r.url.endsWith(`/${resumedId}`))
    report.resume.firstPatchOffset = firstPatch ? firstPatch.offset : null

    step = 'the recent uploads list'
    await page.waitForFunction(
      () =>
        document.querySelectorAll('#recent-rows tr').length >= 2 ||
        document.getElementById('recent-message').textContent !== '',
      null,
      { timeout: 10000, polling: 100 },
    ).catch(() => {})
    report.recent = await readRecent(page)
    await shoot(page, 'completed.png')

    step = 'a file the server refuses'
    const refusedName = path.basename(options.refused)
    await page.setInputFiles('#files', options.refused)
    await waitForState(page, refusedName, ['refused', 'error', 'completed', 'failed'])
    const refused = await readItem(page, refusedName)
    report.refusal = { name: refused.name, state: refused.state, message: refused.message }
    await shoot(page, 'refused.png')
    report.ok = true
  } finally {
    await browser.close()
  }
}

const playwright = loadPlaywright()
if (playwright) {
  run(playwright.chromium).then(
    () => finish(report, 0),
    (e) => finish({ ...report, ok: false, step, error: String(e && e.stack ? e.stack : e) }, 1),
  )
}
