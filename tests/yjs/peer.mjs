// Real Yjs clients for syncfw's interop tests and bench (driven by tests/yjs/client.py).
//
// One JSON request per stdin line, one JSON answer per stdout line. Updates
// travel base64-encoded, format v1 unless a request says v2. Each client is a
// Y.Doc whose 'update' events (except those it got from syncfw) are kept in
// an outbox, as a browser's provider would send them to its server.
import * as Y from 'yjs'
import * as readline from 'node:readline'

const docs = new Map() // id -> {doc, outbox}
const FROM_SYNCFW = 'syncfw'

const b64 = (u8) => Buffer.from(u8).toString('base64')
const bytes = (s) => new Uint8Array(Buffer.from(s, 'base64'))

// A small seeded PRNG (mulberry32): the same seed, the same edits.
function rng (seed) {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6D2B79F5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

function client (id, clientID) {
  const doc = new Y.Doc()
  if (clientID !== undefined) doc.clientID = clientID
  const entry = { doc, outbox: [] }
  doc.on('update', (update, origin) => {
    if (origin !== FROM_SYNCFW) entry.outbox.push(b64(update))
  })
  docs.set(id, entry)
  return entry
}

function content (doc) {
  return {
    t: doc.getText('t').toString(),
    delta: doc.getText('t').toDelta(),
    m: doc.getMap('m').toJSON(),
    a: doc.getArray('a').toJSON()
  }
}

const WORDS = ['bearing ', 'tyre ', 'low ', 'hot ', 'ok ', 'shift ', 'é ', '東京 ', 'pump ']

// One random edit of text, map or array, deletes included.
function edit (doc, r) {
  const t = doc.getText('t')
  const m = doc.getMap('m')
  const a = doc.getArray('a')
  const pick = r()
  if (pick < 0.4) {
    t.insert(Math.floor(r() * (t.length + 1)), WORDS[Math.floor(r() * WORDS.length)])
  } else if (pick < 0.5 && t.length > 0) {
    const at = Math.floor(r() * t.length)
    t.delete(at, Math.min(t.length - at, 1 + Math.floor(r() * 4)))
  } else if (pick < 0.55 && t.length > 0) {
    const at = Math.floor(r() * t.length)
    t.format(at, Math.min(t.length - at, 3), { bold: r() < 0.5 ? true : null })
  } else if (pick < 0.7) {
    const k = 'k' + Math.floor(r() * 6)
    const v = [Math.floor(r() * 100), 'v' + Math.floor(r() * 100), { n: r() < 0.5, l: [1, 2.5] }, null][Math.floor(r() * 4)]
    m.set(k, v)
  } else if (pick < 0.75) {
    m.delete('k' + Math.floor(r() * 6))
  } else if (pick < 0.92) {
    a.insert(Math.floor(r() * (a.length + 1)), [Math.floor(r() * 1000), 'x' + Math.floor(r() * 10)])
  } else if (a.length > 0) {
    const at = Math.floor(r() * a.length)
    a.delete(at, Math.min(a.length - at, 2))
  }
}

const handlers = {
  new: (q) => { client(q.id, q.client); return {} },
  edits: (q) => {
    const { doc } = docs.get(q.id)
    const r = rng(q.seed)
    for (let i = 0; i < q.n; i++) edit(doc, r)
    return {}
  },
  insert: (q) => { docs.get(q.id).doc.getText('t').insert(q.index, q.text); return {} },
  big: (q) => { // one transaction of q.chars characters: a large document
    docs.get(q.id).doc.getText('t').insert(0, 'x'.repeat(q.chars))
    return {}
  },
  outbox: (q) => { const e = docs.get(q.id); const out = e.outbox; e.outbox = []; return { updates: out } },
  // Partial sync between two clients: 'to' gets what it lacks of 'from'.
  sync: (q) => {
    const src = docs.get(q.from).doc
    const dst = docs.get(q.to).doc
    Y.applyUpdate(dst, Y.encodeStateAsUpdate(src, Y.encodeStateVector(dst)), 'peer')
    return {}
  },
  apply: (q) => { Y.applyUpdate(docs.get(q.id).doc, bytes(q.update), FROM_SYNCFW); return {} },
  sv: (q) => ({ sv: b64(Y.encodeStateVector(docs.get(q.id).doc)) }),
  state: (q) => ({ update: b64(Y.encodeStateAsUpdate(docs.get(q.id).doc)) }),
  state_v2: (q) => ({ update: b64(Y.encodeStateAsUpdateV2(docs.get(q.id).doc)) }),
  to_v2: (q) => ({ update: b64(Y.convertUpdateFormatV1ToV2(bytes(q.update))) }),
  content: (q) => ({ content: content(docs.get(q.id).doc) }),
  // What Yjs makes of a set of updates: its own merge, read through a fresh doc.
  merge: (q) => {
    const doc = new Y.Doc()
    Y.applyUpdate(doc, Y.mergeUpdates(q.updates.map(bytes)))
    return { content: content(doc), pending: doc.store.pendingStructs !== null }
  },
  // Many single-edit updates of one client (the bench's remote ops).
  stream: (q) => {
    const e = client(q.id, q.client)
    const r = rng(q.seed)
    for (let i = 0; i < q.n; i++) {
      const t = e.doc.getText('t')
      t.insert(Math.floor(r() * (t.length + 1)), 'ab'[i % 2])
    }
    const out = e.outbox
    e.outbox = []
    return { updates: out }
  }
}

const lines = readline.createInterface({ input: process.stdin })
lines.on('line', (line) => {
  let answer
  try {
    const q = JSON.parse(line)
    answer = { ok: true, ...handlers[q.op](q) }
  } catch (err) {
    answer = { ok: false, error: String(err && err.stack ? err.stack : err) }
  }
  process.stdout.write(JSON.stringify(answer) + '\n')
})
