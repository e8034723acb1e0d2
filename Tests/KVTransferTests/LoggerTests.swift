import XCTest
import KVCore
import KVSystem
import Synchronization

/// The logger (KVSystem): levels, one line per message, and the rate limit that keeps a
/// failure repeating in a loop from flooding standard error.
final class LoggerTests: XCTestCase {
    final class Lines: Sendable {
        let all = Mutex<[String]>([])
        func add(_ s: String) { all.withLock { $0.append(s) } }
        var list: [String] { all.withLock { $0 } }
    }

    func testLevelsAndFormat() {
        let lines = Lines()
        let log = Logger(prefix: "kvstore", level: .warning, sink: { lines.add($0) })
        log.debug("d"); log.info("i"); log.warning("w"); log.error("e")
        XCTAssertEqual(lines.list, ["kvstore: w\n", "kvstore: e\n"])
        XCTAssertEqual(LogLevel(name: "DEBUG"), .debug)
        XCTAssertEqual(LogLevel(name: "warn"), .warning)
        XCTAssertNil(LogLevel(name: "loud"))
    }

    func testABurstIsCutAndTheNextLineSaysHowManyWereSuppressed() {
        let lines = Lines()
        let now = Atomic<UInt64>(1_000_000_000)
        let log = Logger(
            prefix: "m", level: .info, burst: 3, perSecond: 1, clock: { now.load(ordering: .relaxed) },
            sink: { lines.add($0) })
        for i in 0..<10 { log.info("line \(i)") }
        XCTAssertEqual(lines.list, ["m: line 0\n", "m: line 1\n", "m: line 2\n"])
        now.add(1_000_000_000, ordering: .relaxed) // one second: one more line may pass
        log.info("after")
        log.info("dropped")
        XCTAssertEqual(lines.list.count, 4)
        XCTAssertEqual(lines.list.last, "m: after (7 earlier lines suppressed: too many)\n")
        now.add(10_000_000_000, ordering: .relaxed)
        log.info("later")
        XCTAssertEqual(lines.list.last, "m: later (1 earlier line suppressed: too many)\n")
    }
}
