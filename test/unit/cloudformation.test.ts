/**
 * deploy/cloudformation/xks-proxy.json, read as CloudFormation reads it: every
 * Ref, GetAtt and Sub variable resolves; no ingress admits SSH from the world;
 * the proxies' port is open to the ALB's security group only; two instances in
 * two subnets of two availability zones; the target group's health check is
 * GET /ready over HTTP on the proxy's port; HTTPS with a DNS-validated ACM
 * certificate; the Route 53 alias; the outputs the KMS commands need. The
 * instance set-up script is the one deploy/EC2.md describes (its sshd Match
 * block and authorized_keys options, line for line) and bash parses it.
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { describe, it } from "node:test";

const ROOT = new URL("../..", import.meta.url).pathname;
const template = JSON.parse(readFileSync(`${ROOT}deploy/cloudformation/xks-proxy.json`, "utf8"));
type Json = any;
const resources: Record<string, { Type: string; Properties?: Json; DependsOn?: string | string[] }> = template.Resources;
const parameters: Record<string, Json> = template.Parameters;

const PSEUDO = new Set([
  "AWS::AccountId",
  "AWS::NotificationARNs",
  "AWS::NoValue",
  "AWS::Partition",
  "AWS::Region",
  "AWS::StackId",
  "AWS::StackName",
  "AWS::URLSuffix",
]);

/** The return values (Fn::GetAtt) of the resource types the template uses, from the CloudFormation resource reference. */
const ATTRIBUTES: Record<string, string[]> = {
  "AWS::EC2::SecurityGroup": ["GroupId", "VpcId"],
  "AWS::EC2::LaunchTemplate": ["LaunchTemplateId", "LatestVersionNumber", "DefaultVersionNumber"],
  "AWS::EC2::Instance": ["AvailabilityZone", "PrivateDnsName", "PrivateIp", "PublicDnsName", "PublicIp", "InstanceId"],
  "AWS::EC2::EIP": ["AllocationId", "PublicIp"],
  "AWS::EC2::Subnet": ["AvailabilityZone", "CidrBlock", "SubnetId", "VpcId"],
  "AWS::EC2::VPC": ["CidrBlock", "DefaultSecurityGroup", "VpcId"],
  "AWS::ElasticLoadBalancingV2::LoadBalancer": [
    "CanonicalHostedZoneID",
    "DNSName",
    "LoadBalancerArn",
    "LoadBalancerFullName",
    "LoadBalancerName",
    "SecurityGroups",
  ],
  "AWS::ElasticLoadBalancingV2::TargetGroup": ["LoadBalancerArns", "TargetGroupArn", "TargetGroupFullName", "TargetGroupName"],
};

/** Every intrinsic function call under `node`, with where it is. */
function* intrinsics(node: Json, path: string): Generator<{ fn: string; arg: Json; path: string }> {
  if (Array.isArray(node)) {
    for (const [i, v] of node.entries()) yield* intrinsics(v, `${path}[${i}]`);
  } else if (node !== null && typeof node === "object") {
    const keys = Object.keys(node);
    if (keys.length === 1 && (keys[0] === "Ref" || keys[0].startsWith("Fn::"))) yield { fn: keys[0], arg: node[keys[0]], path };
    for (const k of keys) yield* intrinsics(node[k], `${path}.${k}`);
  }
}

/** Why a name used by Ref or in a Sub string does not resolve, or undefined. */
function unresolved(name: string, locals: Record<string, unknown> = {}): string | undefined {
  if (name in locals || name in parameters || name in resources || PSEUDO.has(name)) return undefined;
  const dot = name.indexOf(".");
  if (dot > 0) return unresolvedAtt(name.slice(0, dot), name.slice(dot + 1));
  return `${name} is no parameter, resource or pseudo-parameter`;
}

function unresolvedAtt(resource: string, attribute: string): string | undefined {
  const r = resources[resource];
  if (!r) return `${resource} is no resource`;
  const known = ATTRIBUTES[r.Type];
  if (!known) return `no attribute table for ${r.Type}`;
  return known.includes(attribute) ? undefined : `${r.Type} has no attribute ${attribute}`;
}

/** `${name}`, as a Fn::Sub string writes a variable. */
function v(name: string): string {
  return `\${${name}}`;
}

/** The `${…}` variables of a Sub string (`${!…}` is a literal). */
function subVariables(s: string): string[] {
  return [...s.matchAll(/\$\{([^}]*)\}/g)].map((m) => m[1]).filter((v) => !v.startsWith("!"));
}

/** The set-up script, as Fn::Sub hands it to the instance (parameters replaced by samples). */
const SAMPLES: Record<string, string> = {
  AgentName: "ownermac",
  NodeVersion: "20.20.2",
  SourceRepoUrl: "https://example.com/xks-pair.git",
  SourceRef: "main",
  AgentSshPublicKey: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample xks-agent@owner-mac",
};
function userData(): string {
  const sub = resources.LaunchTemplate.Properties.LaunchTemplateData.UserData["Fn::Base64"]["Fn::Sub"];
  assert.equal(typeof sub, "string");
  return (sub as string).replace(/\$\{([^}]*)\}/g, (_m, v: string) => (v.startsWith("!") ? `\${${v.slice(1)}}` : SAMPLES[v]));
}

/** Every ingress rule of a security group: its inline rules and the SecurityGroupIngress resources that name it. */
function ingressOf(sg: string): Json[] {
  const inline = resources[sg].Properties.SecurityGroupIngress ?? [];
  const separate = Object.values(resources)
    .filter((r) => r.Type === "AWS::EC2::SecurityGroupIngress")
    .map((r) => r.Properties)
    .filter((p) => JSON.stringify(p.GroupId) === JSON.stringify({ "Fn::GetAtt": [sg, "GroupId"] }) || p.GroupId?.Ref === sg);
  return [...inline, ...separate];
}

function coversPort(rule: Json, port: number): boolean {
  if (rule.IpProtocol === "-1" || rule.IpProtocol === -1) return true;
  const from = typeof rule.FromPort === "number" ? rule.FromPort : undefined;
  const to = typeof rule.ToPort === "number" ? rule.ToPort : undefined;
  return from !== undefined && to !== undefined && from <= port && port <= to;
}

/** A rule's source CIDR, when it is the world: literally, or a parameter whose default or pattern lets the world in. */
function worldOpen(rule: Json): boolean {
  if (rule.CidrIp === "0.0.0.0/0" || rule.CidrIpv6 === "::/0") return true;
  for (const key of ["CidrIp", "CidrIpv6"]) {
    const name = rule[key]?.Ref;
    if (name === undefined) continue;
    const p = parameters[name];
    if (p.Default === "0.0.0.0/0" || p.Default === "::/0") return true;
    if (p.AllowedPattern === undefined || new RegExp(p.AllowedPattern).test("0.0.0.0/0")) return true;
  }
  return false;
}

describe("CloudFormation template deploy/cloudformation/xks-proxy.json", () => {
  it("every Ref, GetAtt, Sub variable and DependsOn resolves", () => {
    const problems: string[] = [];
    let count = 0;
    for (const section of ["Resources", "Outputs"] as const) {
      for (const { fn, arg, path } of intrinsics(template[section], section)) {
        count++;
        if (fn === "Ref") {
          const why = unresolved(arg);
          if (why) problems.push(`${path}: ${why}`);
        } else if (fn === "Fn::GetAtt") {
          const [r, a] = Array.isArray(arg) ? arg : String(arg).split(".");
          const why = unresolvedAtt(r, a);
          if (why) problems.push(`${path}: ${why}`);
        } else if (fn === "Fn::Sub") {
          const [s, locals] = Array.isArray(arg) ? arg : [arg, {}];
          for (const v of subVariables(s)) {
            const why = unresolved(v, locals);
            if (why) problems.push(`${path}: \${${v}}: ${why}`);
          }
        }
      }
    }
    for (const [name, r] of Object.entries(resources)) {
      for (const d of [r.DependsOn ?? []].flat()) if (!(d in resources)) problems.push(`${name}.DependsOn: ${d} is no resource`);
    }
    // Rules may use parameters only.
    for (const { fn, arg, path } of intrinsics(template.Rules, "Rules")) {
      if (fn === "Ref" && !(arg in parameters)) problems.push(`${path}: ${arg} is no parameter`);
      if (fn === "Fn::ValueOf" && !(arg[0] in parameters)) problems.push(`${path}: ${arg[0]} is no parameter`);
    }
    assert.deepEqual(problems, []);
    assert.ok(count > 40, `the walk saw the template's intrinsics (${count})`);
    // The check itself catches a dangling name.
    assert.ok(unresolved("NoSuchThing"));
    assert.ok(unresolvedAtt("LoadBalancer", "NoSuchAttribute"));
    assert.equal(unresolved("LoadBalancer.DNSName"), undefined);
  });

  it("no ingress admits SSH from the world; SSH comes from the owner's CIDR, which has no default and refuses 0.0.0.0/0", () => {
    const groups = Object.entries(resources).filter(([, r]) => r.Type === "AWS::EC2::SecurityGroup");
    assert.ok(groups.length >= 2);
    for (const [name] of groups) {
      for (const rule of ingressOf(name)) {
        if (coversPort(rule, 22)) assert.ok(!worldOpen(rule), `${name}: ${JSON.stringify(rule)} admits SSH from the world`);
      }
    }
    const p = parameters.OwnerSshCidr;
    assert.equal(p.Default, undefined, "no default");
    const re = new RegExp(p.AllowedPattern);
    for (const world of ["0.0.0.0/0", "10.0.0.0/8", "1.2.3.4/0"]) assert.ok(!re.test(world), `${world} refused`);
    assert.ok(re.test("198.51.100.7/32") && re.test("198.51.100.0/24"));
    assert.deepEqual(template.Rules.SshNeverFromTheWorld.Assertions[0].Assert, {
      "Fn::Not": [{ "Fn::Equals": [{ Ref: "OwnerSshCidr" }, "0.0.0.0/0"] }],
    });
    // The test's own detector sees an open rule.
    assert.ok(worldOpen({ IpProtocol: "tcp", FromPort: 22, ToPort: 22, CidrIp: "0.0.0.0/0" }));
    assert.ok(worldOpen({ IpProtocol: "-1", CidrIpv6: "::/0" }) && coversPort({ IpProtocol: "-1" }, 22));
  });

  it("the instances admit the proxy port from the ALB's security group only, and SSH from the owner; the ALB admits 443", () => {
    const instanceSg = resources.LaunchTemplate.Properties.LaunchTemplateData.SecurityGroupIds;
    assert.deepEqual(instanceSg, [{ "Fn::GetAtt": ["InstanceSecurityGroup", "GroupId"] }]);
    const rules = ingressOf("InstanceSecurityGroup");
    assert.equal(rules.length, 2, JSON.stringify(rules));
    const proxy = rules.filter((r) => JSON.stringify(r.FromPort) === JSON.stringify({ Ref: "ProxyPort" }));
    assert.equal(proxy.length, 1);
    assert.deepEqual(proxy[0].ToPort, { Ref: "ProxyPort" });
    assert.equal(proxy[0].IpProtocol, "tcp");
    assert.deepEqual(proxy[0].SourceSecurityGroupId, { "Fn::GetAtt": ["AlbSecurityGroup", "GroupId"] });
    assert.equal(proxy[0].CidrIp ?? proxy[0].CidrIpv6 ?? proxy[0].SourcePrefixListId, undefined);
    const ssh = rules.filter((r) => r !== proxy[0]);
    assert.deepEqual(ssh, [{ ...ssh[0], IpProtocol: "tcp", FromPort: 22, ToPort: 22, CidrIp: { Ref: "OwnerSshCidr" } }]);
    const alb = ingressOf("AlbSecurityGroup");
    assert.deepEqual(
      alb.map((r) => [r.IpProtocol, r.FromPort, r.ToPort]),
      [["tcp", 443, 443]],
    );
    assert.deepEqual(resources.LoadBalancer.Properties.SecurityGroups, [{ "Fn::GetAtt": ["AlbSecurityGroup", "GroupId"] }]);
  });

  it("two proxy instances, in two subnets of two availability zones, both targets of the ALB", () => {
    const instances = Object.entries(resources).filter(([, r]) => r.Type === "AWS::EC2::Instance");
    assert.equal(instances.length, 2);
    const subnets = instances.map(([, r]) => r.Properties.SubnetId.Ref as string);
    assert.equal(new Set(subnets).size, 2, "two subnets");
    const zones = subnets.map((s) => resources[s].Properties.AvailabilityZone["Fn::Select"]);
    assert.deepEqual(zones[0][1], zones[1][1], "from the same list of zones");
    assert.deepEqual(zones[0][1], { "Fn::GetAZs": "" });
    assert.notEqual(zones[0][0], zones[1][0], "different zones of it");
    assert.deepEqual(new Set(resources.LoadBalancer.Properties.Subnets.map((s: Json) => s.Ref)), new Set(subnets));
    const targets = resources.TargetGroup.Properties.Targets.map((t: Json) => t.Id.Ref);
    assert.deepEqual(new Set(targets), new Set(instances.map(([name]) => name)));
  });

  it("HTTPS listener with a DNS-validated ACM certificate; target group HTTP to the proxy port, health check GET /ready", () => {
    const tg = resources.TargetGroup.Properties;
    assert.equal(tg.Protocol, "HTTP");
    assert.deepEqual(tg.Port, { Ref: "ProxyPort" });
    assert.equal(tg.HealthCheckPath, "/ready");
    assert.equal(tg.HealthCheckProtocol, "HTTP");
    assert.equal(tg.HealthCheckPort, "traffic-port");
    assert.deepEqual(tg.Matcher, { HttpCode: "200" });
    const listeners = Object.values(resources).filter((r) => r.Type === "AWS::ElasticLoadBalancingV2::Listener");
    assert.equal(listeners.length, 1, "HTTPS only, no plain HTTP listener");
    const l = listeners[0].Properties;
    assert.equal(l.Protocol, "HTTPS");
    assert.equal(l.Port, 443, "KMS always connects on 443");
    assert.match(l.SslPolicy, /^ELBSecurityPolicy-TLS13-1-2-/, "TLS 1.2 and 1.3 only");
    assert.deepEqual(l.DefaultActions, [{ Type: "forward", TargetGroupArn: { Ref: "TargetGroup" } }]);
    const cert = resources[l.Certificates[0].CertificateArn.Ref];
    assert.equal(cert.Type, "AWS::CertificateManager::Certificate");
    assert.equal(cert.Properties.ValidationMethod, "DNS");
    assert.deepEqual(cert.Properties.DomainValidationOptions, [
      { DomainName: { Ref: "DomainName" }, HostedZoneId: { Ref: "HostedZoneId" } },
    ]);
    assert.equal(resources.LoadBalancer.Properties.Scheme, "internet-facing");
    assert.equal(resources.LoadBalancer.Properties.IpAddressType, "ipv4", "KMS reaches external key stores over IPv4 only");
    const dns = resources.DnsRecord.Properties;
    assert.deepEqual(dns.Name, { Ref: "DomainName" });
    assert.deepEqual(dns.AliasTarget.DNSName, { "Fn::GetAtt": ["LoadBalancer", "DNSName"] });
    assert.deepEqual(dns.AliasTarget.HostedZoneId, { "Fn::GetAtt": ["LoadBalancer", "CanonicalHostedZoneID"] });
  });

  it("outputs what the KMS commands and the agent's config need", () => {
    const out = template.Outputs;
    for (const k of [
      "XksProxyUriEndpoint",
      "XksProxyConnectivity",
      "Region",
      "ProxyPort",
      "InstanceAAddress",
      "InstanceBAddress",
      "TunnelUsername",
      "RemoteSocket",
      "TargetGroupArn",
    ])
      assert.ok(out[k]?.Value !== undefined, k);
    assert.deepEqual(out.XksProxyUriEndpoint.Value, { "Fn::Sub": `https://${v("DomainName")}` });
    assert.equal(out.XksProxyConnectivity.Value, "PUBLIC_ENDPOINT");
    assert.deepEqual(out.RemoteSocket.Value, { "Fn::Sub": `/run/xks/${v("AgentName")}/agent.sock` });
    assert.deepEqual(out.TunnelUsername.Value, { "Fn::Sub": `xks-t-${v("AgentName")}` });
  });

  it("the instance set-up is deploy/EC2.md's (sshd Match block, authorized_keys options, users), and bash parses it", () => {
    const script = userData();
    execFileSync("bash", ["-n"], { input: script });
    const ec2 = readFileSync(`${ROOT}deploy/EC2.md`, "utf8");
    const block = /## 2\. sshd_config[\s\S]*?```\n([\s\S]*?)```/.exec(ec2)![1];
    const directives = block
      .split("\n")
      .map((l) => l.trim())
      .filter((l) => l !== "" && !l.startsWith("#"));
    assert.ok(directives.length > 15 && directives[0] === "Match Group xks-tunnels");
    const lines = script.split("\n").map((l) => l.trim());
    for (const d of directives) assert.ok(lines.includes(d), `the set-up has "${d}"`);
    const options = /^(restrict,port-forwarding,command="\/usr\/sbin\/nologin") ssh-ed25519/m.exec(ec2)![1];
    assert.ok(script.includes(`printf '${options} %s\\n' '${SAMPLES.AgentSshPublicKey}'`));
    for (const step of [
      "groupadd --system xks-tunnels",
      "--shell /usr/sbin/nologin xks-proxy",
      'usermod -aG "xks-t-$AGENT" xks-proxy',
      "usermod -p '*' \"xks-t-$AGENT\"",
      "AGENT=ownermac",
      "install -d -o root -g root -m 0755 /etc/ssh/xks-authorized-keys",
      "sshd -t",
      "systemctl reload ssh",
      "SupplementaryGroups=xks-t-$AGENT/",
      "npm ci",
      "npm prune --omit=dev",
      "sha256sum -c -",
    ])
      assert.ok(script.includes(step), step);
    // The public key parameter cannot break out of its single quotes.
    assert.ok(!new RegExp(parameters.AgentSshPublicKey.AllowedPattern).test("ssh-ed25519 AAAA x'; rm -rf /; '"));
    assert.ok(new RegExp(parameters.AgentSshPublicKey.AllowedPattern).test(SAMPLES.AgentSshPublicKey));
  });
});
