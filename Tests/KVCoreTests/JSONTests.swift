import XCTest
@testable import KVCore

/// The JSON reader and base64 of the etcd client: everything etcd (or a liar in its place)
/// sends is bounded and checked, and nothing traps.
final class JSONTests: XCTestCase {
    func testParsesWhatEtcdSends() throws {
        let text =
            #"{"header":{"revision":"12","raft_term":"2"},"kvs":[{"key":"eA==","create_revision":"7","value":"MTI3LjAuMC4xOjE="}],"count":"1","more":false,"n":-1.5e3,"z":null}"#
        let v = try JSONValue.parse(Array(text.utf8))
        XCTAssertEqual(v["header"]?["revision"]?.int64, 12)
        XCTAssertEqual(v["kvs"]?.array?.first?["create_revision"]?.int64, 7)
        XCTAssertEqual(v["more"]?.bool, false)
        XCTAssertEqual(v["n"], .number("-1.5e3"))
        XCTAssertEqual(v["z"], .null)
        XCTAssertNil(v["missing"])
        XCTAssertNil(v["count"]?.array) // wrong shape: nil, not a trap
    }

    func testStringsAndEscapes() throws {
        let v = try JSONValue.parse(Array(#"["a\"b\\c\/d\n\t", "\u00e9\ud83d\ude00", ""]"#.utf8))
        XCTAssertEqual(v.array?.map { $0.string }, ["a\"b\\c/d\n\t", "é😀", ""])
        let quoted = JSONValue.quote("x\"y\\\n\u{1}")
        XCTAssertEqual(quoted, #""x\"y\\\n\u0001""#)
        XCTAssertEqual(try JSONValue.parse(Array(quoted.utf8)).string, "x\"y\\\n\u{1}")
    }

    func testRefusesWhatIsNotJSON() {
        let bad = [
            "", "{", "[1,]", "{\"a\" 1}", "{\"a\":1,}", "tru", "nul", "\"open", "\"\\x\"", "\"\\ud800\"", "01a", "-",
            "1 2", "{\"a\":1}}", "\"a\u{1}b\"", "[" + String(repeating: "[", count: 40) + String(repeating: "]", count: 41),
            String(repeating: "9", count: 100)
        ]
        for text in bad {
            XCTAssertThrowsError(try JSONValue.parse(Array(text.utf8)), text) { e in
                XCTAssertEqual((e as? KVError)?.code, .transfer, text)
            }
        }
        XCTAssertThrowsError(try JSONValue.parse([0x22, 0xFF, 0x22])) // not UTF-8
    }

    func testBase64RoundTripsAndRefusesBadText() {
        var rng = SystemRandomNumberGenerator()
        for n in 0..<40 {
            let bytes = (0..<n).map { _ in UInt8.random(in: 0...255, using: &rng) }
            XCTAssertEqual(Base64.decode(Base64.encode(bytes)), bytes)
        }
        XCTAssertEqual(Base64.encode("/kvstore/x/leader"), "L2t2c3RvcmUveC9sZWFkZXI=")
        XCTAssertEqual(Base64.decode("MTI3LjAuMC4xOjUwMDA="), Array("127.0.0.1:5000".utf8))
        for bad in ["a", "abc", "ab=c", "a===", "====", "ab!d", "YQ==YQ==", "Y=Q="] {
            XCTAssertNil(Base64.decode(bad), bad)
        }
    }
}
