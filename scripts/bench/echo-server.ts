/**
 * A TCP echo server for calibrating round trips (run in its own process:
 * `node --import tsx echo-server.ts <host> <port>`, possibly under `ip netns exec`).
 * Prints "listening" once bound; exits when stdin closes.
 */
import net from "node:net";

const [host, port] = process.argv.slice(2);
const server = net.createServer((sock) => {
  sock.setNoDelay(true);
  sock.on("error", () => sock.destroy());
  sock.pipe(sock);
});
server.listen(Number(port), host, () => console.log("listening"));
process.stdin.resume();
process.stdin.on("end", () => process.exit(0));
