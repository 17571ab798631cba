// Personalised recommendations over a tenant's catalogue, in JavaScript (componentize-js).
//
// Each item is embedded once, when it is added (the platform's `minilm-embed` model), and kept in the
// installation's key-value store: `item:<id>` holds its text and unit vector. A user's recent views
// are kept under `user:<id>` (the newest `recent` of them). Similar items are the nearest by cosine
// similarity; a user's recommendations are the items nearest the mean of what they viewed, less what
// they viewed. The catalogue shares the installation's key quota (1000 keys by default) with users.
//
// Requests (JSON):
//   {"op": "add", "items": [{"id": "sku-1", "text": "Trail running shoes, waterproof"}, …]}   ≤ 64 per call
//   {"op": "remove", "ids": ["sku-1"]}
//   {"op": "similar", "id": "sku-1", "k": 5}        or {"op": "similar", "text": "…", "k": 5}
//   {"op": "view", "user": "u-42", "id": "sku-1"}
//   {"op": "recommend", "user": "u-42", "k": 5}
// Settings: `recent` (how many views to remember per user, default 20).

import { embed } from 'plinth:plugin/inference@0.1.0';
import { get, set, delete as del, listKeys } from 'plinth:plugin/kv@0.1.0';
import { get as setting } from 'plinth:plugin/config@0.1.0';
import { log } from 'plinth:plugin/log@0.1.0';

const MODEL = 'minilm-embed';
const MAX_ADD = 64;
// Keys are at most 256 bytes: the longest prefix (`item:`, `user:`) and an id of this many bytes.
const MAX_ID_BYTES = 200;

function invalid(message) {
  return { tag: 'invalid-request', val: message };
}

function failed(message) {
  return { tag: 'failed', val: message };
}

/** A host call's failure, as the caller should read it (the WIT error variant's message). */
function hostError(what, err) {
  const variant = err?.payload;
  const message = variant ? `${variant.tag}: ${variant.val}` : String(err?.message ?? err);
  return failed(`${what}: ${message}`);
}

function host(what, call) {
  try {
    return call();
  } catch (err) {
    throw hostError(what, err);
  }
}

const encoder = new TextEncoder();
const decoder = new TextDecoder();

function load(key) {
  const bytes = host(`reading ${key}`, () => get(key));
  return bytes === undefined || bytes === null ? null : JSON.parse(decoder.decode(bytes));
}

function store(key, value) {
  host(`storing ${key}`, () => set(key, encoder.encode(JSON.stringify(value))));
}

function unit(vector) {
  let norm = 0;
  for (const x of vector) norm += x * x;
  norm = Math.sqrt(norm) || 1;
  return Array.from(vector, (x) => Math.round((x / norm) * 1e6) / 1e6);
}

function dot(a, b) {
  let sum = 0;
  for (let i = 0; i < a.length; i++) sum += a[i] * b[i];
  return sum;
}

function checkId(id, what) {
  // Bytes, not characters: the store's key limit is in bytes of UTF-8.
  if (typeof id !== 'string' || id.length === 0 || encoder.encode(id).length > MAX_ID_BYTES) {
    throw invalid(`${what}: a string of 1 to ${MAX_ID_BYTES} bytes`);
  }
  return id;
}

function count(k) {
  if (k === undefined) return 5;
  if (!Number.isInteger(k) || k < 1 || k > 50) throw invalid('`k`: an integer from 1 to 50');
  return k;
}

/** Every item in the catalogue: [{id, text, v}] (one removed meanwhile is left out). */
function catalogue() {
  const keys = host('listing the catalogue', () => listKeys('item:'));
  return keys
    .map((key) => ({ id: key.slice('item:'.length), item: load(key) }))
    .filter(({ item }) => item !== null)
    .map(({ id, item }) => ({ id, ...item }));
}

/** The `k` items nearest `vector`, leaving out the ids in `skip`. */
function nearest(vector, k, skip) {
  return catalogue()
    .filter((item) => !skip.has(item.id))
    .map((item) => ({ id: item.id, text: item.text, score: Math.round(dot(vector, item.v) * 1e4) / 1e4 }))
    .sort((a, b) => b.score - a.score || (a.id < b.id ? -1 : 1))
    .slice(0, k);
}

function add(items) {
  if (!Array.isArray(items) || items.length === 0 || items.length > MAX_ADD) {
    throw invalid(`\`items\`: 1 to ${MAX_ADD} items of {id, text}`);
  }
  for (const item of items) {
    checkId(item?.id, '`items[].id`');
    if (typeof item.text !== 'string' || item.text.trim() === '') {
      throw invalid(`\`items[].text\` of ${item.id}: the item's description, as text`);
    }
  }
  const vectors = host('embedding the items', () => embed(MODEL, items.map((item) => item.text)));
  items.forEach((item, i) => store(`item:${item.id}`, { text: item.text, v: unit(vectors[i]) }));
  log('info', `added ${items.length} items`);
  return { added: items.length };
}

function remove(ids) {
  if (!Array.isArray(ids) || ids.length === 0 || ids.length > MAX_ADD) {
    throw invalid(`\`ids\`: 1 to ${MAX_ADD} items to remove`);
  }
  let removed = 0;
  for (const id of ids) {
    checkId(id, '`ids[]`');
    if (host(`removing ${id}`, () => del(`item:${id}`))) removed++;
  }
  return { removed };
}

function similar(request) {
  const k = count(request.k);
  let vector;
  let skip = new Set();
  if (request.id !== undefined) {
    const id = checkId(request.id, '`id`');
    const item = load(`item:${id}`);
    if (item === null) throw invalid(`no item \`${id}\` in the catalogue; add it first`);
    vector = item.v;
    skip = new Set([id]);
  } else if (typeof request.text === 'string' && request.text.trim() !== '') {
    vector = unit(host('embedding the text', () => embed(MODEL, [request.text]))[0]);
  } else {
    throw invalid('`id` (an item) or `text` is required');
  }
  return { items: nearest(vector, k, skip) };
}

function recentLimit() {
  const raw = setting('recent');
  const recent = raw === undefined || raw === null ? 20 : JSON.parse(raw);
  return Number.isInteger(recent) && recent > 0 && recent <= 100 ? recent : 20;
}

function view(request) {
  const user = checkId(request.user, '`user`');
  const id = checkId(request.id, '`id`');
  if (load(`item:${id}`) === null) throw invalid(`no item \`${id}\` in the catalogue`);
  const seen = (load(`user:${user}`) ?? []).filter((other) => other !== id);
  seen.push(id);
  store(`user:${user}`, seen.slice(-recentLimit()));
  return { viewed: seen.length };
}

function recommend(request) {
  const user = checkId(request.user, '`user`');
  const k = count(request.k);
  const seen = load(`user:${user}`) ?? [];
  const vectors = seen.map((id) => load(`item:${id}`)).filter((item) => item !== null).map((item) => item.v);
  if (vectors.length === 0) {
    return { items: [], note: `no views of \`${user}\` yet: send {"op": "view"} as they browse` };
  }
  const mean = vectors[0].map((_, i) => vectors.reduce((sum, v) => sum + v[i], 0) / vectors.length);
  return { items: nearest(unit(mean), k, new Set(seen)), based_on: seen.length };
}

export const handler = {
  handle(request) {
    let body;
    try {
      body = JSON.parse(request);
    } catch (err) {
      throw invalid(`the request is not JSON: ${err.message}`);
    }
    switch (body?.op) {
      case 'add':
        return JSON.stringify(add(body.items));
      case 'remove':
        return JSON.stringify(remove(body.ids));
      case 'similar':
        return JSON.stringify(similar(body));
      case 'view':
        return JSON.stringify(view(body));
      case 'recommend':
        return JSON.stringify(recommend(body));
      default:
        throw invalid('`op`: one of add, remove, similar, view, recommend');
    }
  },
};
