/**
 * JSON with comments (JSONC), as config files may carry them: `// …` to the end
 * of the line and `/* … *\/` blocks are removed when they stand outside a
 * string. Each comment character becomes a space (line ends are kept), so the
 * parser's error positions still point at the right line and column. Nothing
 * else is relaxed: trailing commas, single quotes and the like stay errors.
 */
export function stripJsonComments(text: string): string {
  let out = "";
  let i = 0;
  let copied = 0;
  const blank = (from: number, to: number) => {
    out += text.slice(copied, from) + text.slice(from, to).replace(/[^\r\n]/g, " ");
    copied = to;
  };
  while (i < text.length) {
    const ch = text[i];
    if (ch === '"') {
      // A string: skip to its closing quote, stepping over escapes.
      i++;
      while (i < text.length && text[i] !== '"' && text[i] !== "\n") i += text[i] === "\\" ? 2 : 1;
      i++;
    } else if (ch === "/" && text[i + 1] === "/") {
      let end = text.indexOf("\n", i);
      if (end < 0) end = text.length;
      blank(i, end);
      i = end;
    } else if (ch === "/" && text[i + 1] === "*") {
      const close = text.indexOf("*/", i + 2);
      // An unclosed block is left as it is, so that JSON.parse reports it.
      if (close < 0) break;
      blank(i, close + 2);
      i = close + 2;
    } else {
      i++;
    }
  }
  return out + text.slice(copied);
}
