// Stitch's upload page: picks or takes dropped files and uploads each with tus-js-client
// (vendor/tus.min.js) to the tus endpoint, then follows the upload's merge through its status
// until the server has the verified file, and lists the tenant's recent uploads.
//
// Plain script, no framework and no build step: the server embeds this directory as it is.
// The page's Content-Security-Policy allows scripts and styles from this origin only, so
// nothing here writes HTML from strings or sets inline style attributes.
//
// Credentials: the page never holds an API key. It uses, in this order,
//   1. a capability token in the page's URL (`#token=st1.…`, a shared "upload here" link):
//      sent as `Authorization: Bearer` on every request and as `?token=` on download links;
//   2. with `auth: "keys"` and a `token_url` in /ui/config.json: a token per upload, asked
//      of that URL (the site's own backend, which calls POST /upload/tokens with its key);
//   3. nothing (auth "none", or protected mode on loopback: the server lets this machine in).
//
// Resuming: tus-js-client keeps each unfinished upload's URL in localStorage under the file's
// fingerprint (name, type, size, modification time, endpoint). Choosing the same file again,
// after a reload or a lost network, resumes it from the offset the server reports.

'use strict'

;(function () {
  const MiB = 1024 * 1024
  /** Bytes per PATCH: big enough to keep the line busy, small enough that a lost PATCH costs little. */
  const CHUNK_SIZE = 8 * MiB
  /** Files at least this large go up as parallel partial uploads (tus concatenation). */
  const PARALLEL_MIN_BYTES = 64 * MiB
  const PARALLEL_UPLOADS = 3
  /** tus-js-client's retries of a failed request (network, 5xx, 409, 423): about a minute. */
  const RETRY_DELAYS = [0, 1000, 3000, 5000, 10000, 20000, 30000]
  /** How often the merge state is asked for once the bytes are all sent. */
  const STATUS_POLL_MS = 1000
  /** Speed is averaged over this window of progress samples. */
  const SPEED_WINDOW_MS = 4000
  const RECENT_PAGE = 20

  const DEFAULT_CONFIG = {
    tus_endpoint: '/files/',
    auth: 'none',
    token_url: null,
    max_upload_bytes: null,
  }

  /** What the page shows for the server's error codes (docs/protocol.md, "Errors"). */
  const REFUSALS = {
    quota_exceeded: (status) =>
      status === 413
        ? 'This file is larger than your account may upload.'
        : 'Your account has reached its upload quota (uploads in progress or space used). ' +
          'Wait for uploads to finish or delete files, then try again.',
    upload_too_large: () => 'This file is larger than this server accepts.',
    unauthorized: () => 'Not authorized: the upload link is missing, wrong or expired; ask for a new one.',
    forbidden: () =>
      'Not allowed: this link does not permit this upload (another file, or too large for it).',
    rejected_by_hook: () => 'Refused by the site:',
    insufficient_storage: () => 'The server is out of space. Try again later.',
    upload_expired: () => 'This upload expired on the server before it was finished.',
    upload_aborted: () => 'This upload was cancelled on the server.',
    upload_not_found: () => 'The server does not know this upload any more.',
    hook_unavailable: () => 'The site could not be asked whether it accepts this file.',
    too_busy: () => 'The server is busy.',
    unavailable: () => 'The server is temporarily unavailable.',
    checksum_mismatch: () => 'The data arrived damaged.',
    tokens_disabled: () => 'This server does not issue upload tokens.',
  }

  const $ = (id) => document.getElementById(id)

  const page = {
    config: DEFAULT_CONFIG,
    /** The token from the URL (`#token=`), or null. */
    linkToken: null,
    endpoint: null,
    recentCursor: null,
  }

  // ---- formatting ----------------------------------------------------------------------

  function formatBytes(n) {
    if (n == null || Number.isNaN(n)) return '—'
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB']
    let i = 0
    let v = n
    while (v >= 1024 && i < units.length - 1) {
      v /= 1024
      i++
    }
    return i === 0 ? `${n} B` : `${v.toFixed(v < 10 ? 2 : v < 100 ? 1 : 0)} ${units[i]}`
  }

  function formatDuration(seconds) {
    if (!Number.isFinite(seconds) || seconds < 0) return '—'
    const s = Math.round(seconds)
    if (s < 60) return `${s} s`
    if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`
    return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`
  }

  // ---- credentials and requests --------------------------------------------------------

  function tokenFromHash() {
    const params = new URLSearchParams(window.location.hash.replace(/^#/, ''))
    const token = params.get('token')
    return token && token.trim() ? token.trim() : null
  }

  function authHeaders(token) {
    return token ? { Authorization: `Bearer ${token}` } : {}
  }

  /** A download link for `url`, with the token in the query when there is one. */
  function downloadHref(url, token) {
    const u = new URL(url, window.location.href)
    if (token) u.searchParams.set('token', token)
    return u.toString()
  }

  /** The server's JSON error of a response body, if it is one. */
  function parseError(body) {
    try {
      const parsed = JSON.parse(body)
      if (parsed && parsed.error && typeof parsed.error.code === 'string') return parsed.error
    } catch (_) {
      // Not JSON: a proxy's page, or nothing.
    }
    return null
  }

  /** What to tell the user about a refusal: the code's sentence and the server's message. */
  function describeRefusal(status, error, retryAfter) {
    if (!error) return `The server answered ${status}.`
    const known = REFUSALS[error.code]
    const said = error.message || ''
    let text = known ? known(status) : said || error.code
    if (known && said) {
      // "Sentence (the server's words)." or, for a sentence that introduces them, "Sentence: words".
      text = text.endsWith(':')
        ? `${text} ${said}`
        : `${text.replace(/\.$/, '')} (${said.replace(/\.$/, '')}).`
    }
    if (retryAfter) text += ` Retry after ${retryAfter} s.`
    return `${text} [${error.code}]`
  }

  async function fetchJson(url, token, init) {
    const response = await fetch(url, {
      credentials: 'same-origin',
      ...init,
      headers: { Accept: 'application/json', ...authHeaders(token), ...((init && init.headers) || {}) },
      cache: 'no-store',
    })
    const text = await response.text()
    if (!response.ok) {
      const err = new Error(describeRefusal(response.status, parseError(text), response.headers.get('Retry-After')))
      err.status = response.status
      err.code = (parseError(text) || {}).code
      throw err
    }
    return text ? JSON.parse(text) : null
  }

  /**
   * A capability token for one upload from the site's backend (`token_url`): it answers
   * `{"token": "st1.…"}` for `{"filename", "size"}` (and `upload_id` when resuming one).
   */
  async function tokenForUpload(file, uploadId) {
    const body = { filename: file.name, size: file.size }
    if (uploadId) body.upload_id = uploadId
    const answer = await fetchJson(page.config.token_url, null, {
      method: 'POST',
      // The backend knows its user by its own cookies, also from another origin (which the
      // server's CSP then names in connect-src, and which must answer CORS with credentials).
      credentials: 'include',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify(body),
    })
    if (!answer || typeof answer.token !== 'string') {
      throw new Error('The token service answered without a token.')
    }
    return answer.token
  }

  // ---- one file ------------------------------------------------------------------------

  /** The last path segment of a tus upload URL: the upload id. */
  function uploadIdOf(url) {
    const path = new URL(url, window.location.href).pathname.replace(/\/+$/, '')
    return decodeURIComponent(path.slice(path.lastIndexOf('/') + 1))
  }

  class FileUpload {
    constructor(file) {
      this.file = file
      this.token = page.linkToken
      this.upload = null
      this.samples = []
      this.polling = null
      this.state = 'starting'
      this.el = document.importNode($('upload-item').content, true).firstElementChild
      this.q = (sel) => this.el.querySelector(sel)
      this.q('.name').textContent = file.name
      this.q('.size').textContent = formatBytes(file.size)
      this.q('progress').setAttribute('aria-label', `Upload of ${file.name}`)
      this.q('.pause').addEventListener('click', () => this.pause())
      this.q('.resume').addEventListener('click', () => this.resume())
      this.q('.remove').addEventListener('click', () => this.remove())
      $('queue').prepend(this.el)
      $('queue-empty').hidden = true
      this.setState('starting', 'Starting…')
    }

    setState(state, text) {
      this.state = state
      this.el.dataset.state = state
      this.q('.state').textContent = text
      const active = state === 'uploading' || state === 'starting'
      const stopped = state === 'paused' || state === 'error'
      this.q('.pause').hidden = !active
      this.q('.resume').hidden = !stopped
      this.q('.remove').hidden = active || state === 'merging'
      if (!active) this.q('.rate').textContent = ''
    }

    showError(text) {
      const message = this.q('.message')
      message.textContent = text
      message.hidden = !text
    }

    async start() {
      try {
        await this.prepare()
      } catch (err) {
        this.fail(err.message || String(err))
        return
      }
      this.setState('uploading', this.resumedFrom ? `Resuming at ${formatBytes(this.resumedFrom)}…` : 'Uploading…')
      this.upload.start()
    }

    /** Builds the tus upload, resuming the one this browser stored for the same file. */
    async prepare() {
      const perUploadToken = !this.token && page.config.auth === 'keys' && page.config.token_url
      const parallel = !perUploadToken && this.file.size >= PARALLEL_MIN_BYTES ? PARALLEL_UPLOADS : 1
      const options = {
        endpoint: page.endpoint,
        chunkSize: CHUNK_SIZE,
        parallelUploads: parallel,
        retryDelays: RETRY_DELAYS,
        metadata: { filename: this.file.name, filetype: this.file.type || 'application/octet-stream' },
        headers: {},
        removeFingerprintOnSuccess: true,
        onProgress: (sent, total) => this.progress(sent, total),
        onSuccess: () => this.sent(),
        onError: (err) => this.failed(err),
      }
      // A token bound to one upload: one upload, no partial uploads (a concatenation is several).
      this.upload = new window.tus.Upload(this.file, options)
      const previous = await this.upload.findPreviousUploads()
      let resumeId = null
      if (previous.length > 0) {
        // The newest stored upload of this file.
        previous.sort((a, b) => String(b.creationTime).localeCompare(String(a.creationTime)))
        this.upload.resumeFromPreviousUpload(previous[0])
        if (previous[0].uploadUrl) resumeId = uploadIdOf(previous[0].uploadUrl)
        this.resumedFrom = await this.serverOffset(previous[0].uploadUrl)
      }
      if (perUploadToken) this.token = await tokenForUpload(this.file, resumeId)
      Object.assign(options.headers, authHeaders(this.token))
    }

    /** What the server holds of a stored upload (HEAD), to say where it resumes; 0 if unknown. */
    async serverOffset(url) {
      if (!url) return 0
      try {
        const response = await fetch(url, {
          method: 'HEAD',
          headers: { 'Tus-Resumable': '1.0.0', ...authHeaders(this.token) },
          cache: 'no-store',
        })
        return response.ok ? Number(response.headers.get('Upload-Offset')) || 0 : 0
      } catch (_) {
        return 0
      }
    }

    progress(sent, total) {
      const now = performance.now()
      this.samples.push([now, sent])
      while (this.samples.length > 2 && now - this.samples[0][0] > SPEED_WINDOW_MS) this.samples.shift()
      const percent = total > 0 ? (sent / total) * 100 : 0
      const bar = this.q('progress')
      bar.value = percent
      bar.setAttribute('aria-valuetext', `${percent.toFixed(0)} percent`)
      const [t0, b0] = this.samples[0]
      const speed = now > t0 ? ((sent - b0) * 1000) / (now - t0) : 0
      const left = speed > 0 ? (total - sent) / speed : NaN
      if (this.state === 'uploading') {
        this.q('.state').textContent = `${formatBytes(sent)} of ${formatBytes(total)} (${percent.toFixed(0)} %)`
        this.q('.rate').textContent = speed > 0 ? `${formatBytes(speed)}/s · ${formatDuration(left)} left` : ''
      }
    }

    pause() {
      if (!this.upload) return
      this.upload.abort()
      this.setState('paused', `Paused at ${this.q('progress').value.toFixed(0)} %`)
    }

    resume() {
      this.showError('')
      this.samples = []
      if (!this.upload) {
        this.start()
        return
      }
      this.setState('uploading', 'Resuming…')
      this.upload.start()
    }

    remove() {
      if (this.upload && this.state !== 'completed') this.upload.abort()
      clearInterval(this.polling)
      this.el.remove()
      $('queue-empty').hidden = $('queue').children.length > 0
    }

    failed(err) {
      const response = err && err.originalResponse
      if (response && response.getStatus()) {
        const status = response.getStatus()
        const text = describeRefusal(status, parseError(response.getBody()), response.getHeader('Retry-After'))
        this.fail(text, status >= 400 && status < 500 && status !== 409 && status !== 423)
        return
      }
      // No answer at all: the network is gone; the page resumes when the browser is back online.
      this.setState('error', 'Connection lost')
      this.showError('The connection to the server was lost. The upload resumes when the network is back, or press Resume.')
    }

    fail(text, refused = true) {
      this.setState(refused ? 'refused' : 'error', refused ? 'Refused' : 'Stopped')
      this.q('.resume').hidden = refused
      this.q('.remove').hidden = false
      this.showError(text)
    }

    /** All bytes are on the server: follow the merge until the file is verified. */
    sent() {
      this.q('progress').value = 100
      this.id = uploadIdOf(this.upload.url)
      this.el.dataset.uploadId = this.id
      this.setState('merging', 'All bytes sent; the server is assembling the file…')
      const poll = async () => {
        let status
        try {
          status = await fetchJson(`/upload/${encodeURIComponent(this.id)}/status`, this.token)
        } catch (err) {
          if (err.status === 401 || err.status === 403 || err.status === 404) {
            clearInterval(this.polling)
            this.fail(err.message)
          }
          return // A passing failure: the next poll asks again.
        }
        this.showStatus(status)
      }
      poll()
      this.polling = setInterval(poll, STATUS_POLL_MS)
    }

    showStatus(status) {
      if (status.state === 'merging' || status.state === 'receiving') {
        const done = status.merge_bytes_done
        const size = status.total_size
        this.q('.state').textContent =
          done != null && size
            ? `Assembling: ${formatBytes(done)} of ${formatBytes(size)} checked`
            : 'All bytes sent; the server is assembling the file…'
        return
      }
      clearInterval(this.polling)
      if (status.state === 'completed') {
        this.setState('completed', 'Completed')
        this.q('.result-size').textContent = `${formatBytes(status.size)} (${status.size} bytes)`
        this.q('.result-md5').textContent = status.md5
        const link = this.q('.result-link')
        link.href = downloadHref(status.download_url || `/files/${encodeURIComponent(this.id)}`, this.token)
        link.textContent = `Download ${status.filename || this.file.name}`
        link.setAttribute('download', status.filename || this.file.name)
        this.q('.result').hidden = false
        refreshRecent()
      } else {
        const reason = status.failure_reason ? `: ${status.failure_reason}` : ''
        this.fail(`The server could not assemble the file (${status.state}${reason}).`)
        this.setState(status.state, status.state === 'failed' ? 'Failed' : 'Cancelled')
      }
    }
  }

  const uploads = []

  function addFiles(files) {
    for (const file of files) {
      const item = new FileUpload(file)
      uploads.push(item)
      item.start()
    }
  }

  // ---- recent uploads ------------------------------------------------------------------

  function recentRow(view) {
    const tr = document.createElement('tr')
    const cell = (text, cls) => {
      const td = document.createElement('td')
      if (cls) td.className = cls
      if (text instanceof Node) td.append(text)
      else td.textContent = text
      tr.append(td)
      return td
    }
    cell(view.filename || view.upload_id)
    cell(view.state)
    cell(formatBytes(view.size != null ? view.size : view.total_size), 'num')
    const md5 = document.createElement('code')
    md5.textContent = view.md5 || '—'
    cell(md5)
    if (view.state === 'completed' && view.download_url) {
      const a = document.createElement('a')
      a.href = downloadHref(view.download_url, page.linkToken)
      a.textContent = 'Download'
      a.setAttribute('aria-label', `Download ${view.filename || view.upload_id}`)
      cell(a)
    } else {
      cell('—')
    }
    return tr
  }

  async function loadRecent(more) {
    const message = $('recent-message')
    const params = new URLSearchParams({ limit: String(RECENT_PAGE) })
    if (more && page.recentCursor) params.set('cursor', page.recentCursor)
    let answer
    try {
      answer = await fetchJson(`/uploads?${params}`, page.linkToken)
    } catch (err) {
      $('recent').hidden = true
      $('recent-more').hidden = true
      message.textContent =
        err.status === 403
          ? 'This credential may not list uploads.'
          : `The recent uploads could not be loaded: ${err.message}`
      return
    }
    const rows = $('recent-rows')
    if (!more) rows.replaceChildren()
    for (const view of answer.uploads || []) rows.append(recentRow(view))
    page.recentCursor = answer.next_cursor || null
    $('recent-more').hidden = !page.recentCursor
    $('recent').hidden = rows.children.length === 0
    message.textContent = rows.children.length === 0 ? 'No uploads yet.' : ''
  }

  let recentTimer = null
  /** Reloads the first page of the list, once for a burst of completions. */
  function refreshRecent() {
    clearTimeout(recentTimer)
    recentTimer = setTimeout(() => loadRecent(false), 300)
  }

  // ---- wiring --------------------------------------------------------------------------

  async function loadConfig() {
    try {
      const config = await fetchJson('/ui/config.json', null)
      return { ...DEFAULT_CONFIG, ...config }
    } catch (err) {
      const box = $('config-error')
      box.textContent = `The page's settings could not be loaded (${err.message}); using the defaults.`
      box.hidden = false
      return DEFAULT_CONFIG
    }
  }

  function describeAuth() {
    const note = $('auth-note')
    if (page.linkToken) {
      note.textContent = 'You are using an upload link: files go to the account that shared it.'
      note.hidden = false
    } else if (page.config.auth === 'keys' && page.config.token_url) {
      note.textContent = 'Each upload is authorized by this site before it starts.'
      note.hidden = false
    }
  }

  function wireDrop() {
    const drop = $('drop')
    const input = $('files')
    input.addEventListener('change', () => {
      addFiles(Array.from(input.files))
      input.value = '' // So that choosing the same file again (to resume it) fires `change`.
    })
    const over = (on) => (event) => {
      event.preventDefault()
      drop.classList.toggle('over', on)
    }
    drop.addEventListener('dragenter', over(true))
    drop.addEventListener('dragover', over(true))
    drop.addEventListener('dragleave', over(false))
    drop.addEventListener('drop', (event) => {
      over(false)(event)
      const files = Array.from((event.dataTransfer && event.dataTransfer.files) || [])
      if (files.length) addFiles(files)
    })
    // A file dropped beside the zone must not replace the page.
    window.addEventListener('dragover', (event) => event.preventDefault())
    window.addEventListener('drop', (event) => event.preventDefault())
  }

  async function main() {
    if (!window.tus || !window.tus.isSupported) {
      $('config-error').textContent = 'This browser cannot run the uploader (tus-js-client did not load).'
      $('config-error').hidden = false
      return
    }
    page.linkToken = tokenFromHash()
    page.config = await loadConfig()
    page.endpoint = new URL(page.config.tus_endpoint || '/files/', window.location.href).toString()
    $('endpoint').textContent = page.config.tus_endpoint
    if (page.config.max_upload_bytes) {
      $('limits').textContent = `Up to ${formatBytes(page.config.max_upload_bytes)} per file.`
    }
    describeAuth()
    wireDrop()
    $('recent-refresh').addEventListener('click', () => loadRecent(false))
    $('recent-more').addEventListener('click', () => loadRecent(true))
    // Back online: resume what the lost network stopped.
    window.addEventListener('online', () => {
      for (const item of uploads) if (item.state === 'error') item.resume()
    })
    document.body.dataset.ready = 'true'
    loadRecent(false)
  }

  document.addEventListener('DOMContentLoaded', main)
})()
