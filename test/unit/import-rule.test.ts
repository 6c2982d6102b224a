/**
 * The dependency rule, enforced by reading every import of every TypeScript
 * file in the repository:
 *
 *   agent/, proxy/, shared/   the product: import the product only (agent and proxy never each
 *                             other), and of npm packages only runtime `dependencies`, since
 *                             production installs with `npm ci --omit=dev`; pkcs11js, an
 *                             optional dependency, only from agent/
 *   testbed/                  stands the system up and talks to it like KMS: imports the product
 *                             and itself, never test/ or scripts/
 *   test/                     the product, the test-bed and itself, never scripts/
 *   scripts/                  the product, the test-bed and itself, never test/
 */
import assert from "node:assert/strict";
import { readdirSync, readFileSync } from "node:fs";
import { builtinModules } from "node:module";
import { dirname, join, relative, resolve } from "node:path";
import { test } from "node:test";
import { PACKAGE_ROOT } from "../../shared/paths.ts";

type Area = "agent" | "proxy" | "shared" | "testbed" | "test" | "scripts";
const AREAS: Area[] = ["agent", "proxy", "shared", "testbed", "test", "scripts"];

/** Which areas each area may import from. */
const ALLOWED: Record<Area, Area[]> = {
  agent: ["agent", "shared"],
  proxy: ["proxy", "shared"],
  shared: ["shared"],
  testbed: ["agent", "proxy", "shared", "testbed"],
  test: ["agent", "proxy", "shared", "testbed", "test"],
  scripts: ["agent", "proxy", "shared", "testbed", "scripts"],
};
const PRODUCT = new Set<Area>(["agent", "proxy", "shared"]);

const pkg = JSON.parse(readFileSync(join(PACKAGE_ROOT, "package.json"), "utf8")) as {
  dependencies: Record<string, string>;
  optionalDependencies: Record<string, string>;
  devDependencies: Record<string, string>;
};
/**
 * Optional runtime dependencies (native addons whose build may fail where no C++ toolchain is
 * installed) and the one area that may import each: the proxy host needs none of them.
 */
const OPTIONAL_FOR: Record<string, Area[]> = { pkcs11js: ["agent"] };

function tsFiles(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    const p = join(dir, e.name);
    if (e.isDirectory()) return tsFiles(p);
    return e.name.endsWith(".ts") ? [p] : [];
  });
}

/** Module specifiers of static imports, re-exports and dynamic imports. */
export function specifiers(source: string): string[] {
  const out: string[] = [];
  const re =
    /(?:^|\n)\s*(?:import|export)\s[^;]*?\sfrom\s+["']([^"']+)["']|(?:^|\n)\s*import\s+["']([^"']+)["']|\bimport\(\s*["']([^"']+)["']\s*\)/g;
  for (let m = re.exec(source); m !== null; m = re.exec(source)) out.push(m[1] ?? m[2] ?? m[3]);
  return out;
}

const areaOf = (file: string): Area | undefined => AREAS.find((a) => relative(PACKAGE_ROOT, file).split("/")[0] === a);
/** The npm package a bare specifier names (`@scope/name` or `name`), or undefined for node: builtins. */
const packageOf = (spec: string): string | undefined => {
  if (spec.startsWith("node:") || builtinModules.includes(spec)) return undefined;
  const parts = spec.split("/");
  return spec.startsWith("@") ? `${parts[0]}/${parts[1]}` : parts[0];
};

test("the scanner sees every kind of import", () => {
  // Written with real line breaks, as source is; the dynamic import is spelled in two pieces so
  // that this file's own scan does not see it.
  const dynamic = "imp" + 'ort("./dyn.ts")';
  const src = [
    'import a from "x";',
    "import { b,",
    '  c } from "./y.ts";',
    'import type { D } from "../z.ts";',
    'export { e } from "@s/p/q";',
    'import "side";',
    `const f = await ${dynamic};`,
  ].join("\n");
  assert.deepEqual(specifiers(src), ["x", "./y.ts", "../z.ts", "@s/p/q", "side", "./dyn.ts"]);
});

test("every import follows the dependency rule", () => {
  const broken: string[] = [];
  let files = 0;
  for (const area of AREAS) {
    for (const file of tsFiles(join(PACKAGE_ROOT, area))) {
      files++;
      const where = relative(PACKAGE_ROOT, file);
      for (const spec of specifiers(readFileSync(file, "utf8"))) {
        if (spec.startsWith(".")) {
          const target = areaOf(resolve(dirname(file), spec));
          if (target === undefined) broken.push(`${where} imports ${spec}, outside the source areas`);
          else if (!ALLOWED[area].includes(target)) broken.push(`${where} (${area}) imports ${spec} (${target})`);
          continue;
        }
        const p = packageOf(spec);
        if (p === undefined) continue;
        const optional = p in pkg.optionalDependencies;
        if (PRODUCT.has(area) && optional && !OPTIONAL_FOR[p]?.includes(area))
          broken.push(`${where} imports ${p}, an optional dependency that ${area}/ may not need`);
        else if (PRODUCT.has(area) && !optional && !(p in pkg.dependencies))
          broken.push(`${where} imports ${p}, which is not a runtime dependency`);
        else if (!(p in pkg.dependencies) && !optional && !(p in pkg.devDependencies))
          broken.push(`${where} imports ${p}, which package.json does not list`);
      }
    }
  }
  assert.ok(files > 100, `only ${files} files scanned`);
  assert.deepEqual(broken, []);
});
