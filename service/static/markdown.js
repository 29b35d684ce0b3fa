// Agents' Markdown -> safe DOM: marked (GFM) parses, DOMPurify sanitises, and nothing else turns text into HTML.
// Raw HTML in a message is shown as the text it is (a model writing `<div>` or `Vec<T>` means the characters), so
// DOMPurify is the second wall, not the only one: it still strips what Markdown itself can produce, such as a
// `javascript:` link. Images become plain links: a picture URL fetched on render would let a prompt-injected answer
// send data to anyone's server without a click.

import { Marked } from "./vendor-marked.js";
import DOMPurify from "./vendor-dompurify.js";

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

const marked = new Marked({
  gfm: true,
  breaks: true, // chat text: a single newline is a line break, as the plain-text rendering always showed it
  async: false,
  renderer: {
    html({ text, block }) {
      return block ? `<p class="raw">${escapeHtml(text)}</p>` : escapeHtml(text);
    },
    image({ href, title, text }) {
      const label = escapeHtml(text || title || href || "image");
      return href ? `<a href="${escapeHtml(href)}">${label}</a>` : label;
    },
  },
});

const PURIFY = {
  USE_PROFILE: { html: true },
  // Nothing that could pass for the page's own controls, restyle it, or load something by itself.
  FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select", "option", "img", "video", "audio", "iframe"],
  FORBID_ATTR: ["style", "id", "name", "srcset"],
  RETURN_DOM_FRAGMENT: true,
};

/** The sanitised DOM of one Markdown text; links open in a new tab without access to this one. */
export function markdownFragment(text) {
  let html;
  try {
    html = marked.parse(String(text));
  } catch (exc) {
    html = `<p>${escapeHtml(text)}</p>`;
  }
  const frag = DOMPurify.sanitize(html, PURIFY);
  for (const a of frag.querySelectorAll("a")) {
    if (a.hasAttribute("href")) {
      a.target = "_blank";
      a.rel = "noopener noreferrer";
    }
  }
  // Wide tables scroll inside their own box instead of widening the bubble.
  for (const table of frag.querySelectorAll("table")) {
    const wrap = document.createElement("div");
    wrap.className = "table-wrap";
    table.replaceWith(wrap);
    wrap.append(table);
  }
  return frag;
}

/** Replaces the children of `node` with the rendered Markdown of `text`. */
export function renderMarkdownInto(node, text) {
  node.replaceChildren(markdownFragment(text));
}
