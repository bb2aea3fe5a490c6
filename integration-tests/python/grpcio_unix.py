#!/usr/bin/env python3
"""A stock gRPC client (Python grpcio) over rootletd's Unix socket.

Generates its stubs from proto/rootlet/v1/rootlet.proto into a temporary
directory (nothing generated is committed), then calls GetCapabilities,
LoadRootlet on --netns/--ifname, ListRootlets, GetRootlet, an error with its
google.rpc details, and UnloadRootlet; prints ALL_OK. Without --authority
the channel has grpcio's defaults: for a unix: target it sends the
percent-encoded socket path as :authority, which rootletd makes valid below
h2 (server/src/runtime/authority.rs). With --authority NAME it sets
grpc.default_authority=NAME, the setting deploy/README.md documents.

Run by integration-tests/tests/grpcio.rs; exits non-zero on any mismatch.
"""

import argparse
import os
import sys
import tempfile


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def check(cond, msg):
    if not cond:
        fail(msg)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--proto-root", required=True)
    ap.add_argument("--socket", required=True)
    ap.add_argument("--authority")
    ap.add_argument("--netns", default="")
    ap.add_argument("--ifname", default="")
    args = ap.parse_args()

    import grpc
    from grpc_tools import protoc
    from grpc_status import rpc_status
    from google.rpc import error_details_pb2

    gen = tempfile.mkdtemp(prefix="rootlet-grpcio-")
    rc = protoc.main([
        "grpc_tools.protoc",
        f"-I{args.proto_root}",
        f"--python_out={gen}",
        f"--grpc_python_out={gen}",
        os.path.join(args.proto_root, "rootlet/v1/rootlet.proto"),
    ])
    check(rc == 0, f"protoc failed ({rc})")
    sys.path.insert(0, gen)
    from rootlet.v1 import rootlet_pb2 as pb
    from rootlet.v1 import rootlet_pb2_grpc as rpc

    options = []
    if args.authority:
        options.append(("grpc.default_authority", args.authority))
    channel = grpc.insecure_channel(f"unix:{args.socket}", options=options)
    grpc.channel_ready_future(channel).result(timeout=30)
    stub = rpc.RootletStub(channel)

    caps = stub.GetCapabilities(pb.GetCapabilitiesRequest(), timeout=30)
    check(caps.kernel, f"GetCapabilities has the kernel: {caps}")
    check(any(p.name == "xdp" and p.permitted for p in caps.probes), f"xdp probe: {caps}")
    print(f"GetCapabilities: kernel {caps.kernel}, backend {pb.Backend.Name(caps.backend)}")

    iface = pb.Interface(netns=args.netns, ifname=args.ifname)
    loaded = stub.LoadRootlet(pb.LoadRootletRequest(
        interface=iface,
        mode=pb.XDP_MODE_GENERIC,
        final_verdict=pb.XDP_ACTION_PASS,
    ), timeout=120)
    check(loaded.id.startswith("netns:"), f"LoadRootlet gives an id: {loaded}")
    check(loaded.interface.ifname == args.ifname, f"LoadRootlet's interface: {loaded}")
    check(loaded.final_verdict == pb.XDP_ACTION_PASS, f"final verdict PASS: {loaded}")
    print(f"LoadRootlet: {loaded.id} generation {loaded.generation}")

    listed = stub.ListRootlets(pb.ListRootletsRequest(), timeout=30)
    check([r.id for r in listed.rootlets] == [loaded.id], f"ListRootlets lists it alone: {listed}")

    ref = pb.RootletRef(id=loaded.id)
    got = stub.GetRootlet(pb.GetRootletRequest(rootlet=ref), timeout=30)
    check(got.id == loaded.id and got.generation == loaded.generation and not got.drift,
          f"GetRootlet: {got}")
    print(f"GetRootlet: {got.id} generation {got.generation}")

    # An error: its code and its google.rpc details arrive.
    try:
        stub.GetRootlet(pb.GetRootletRequest(rootlet=pb.RootletRef(id="not-an-id")), timeout=30)
        fail("GetRootlet with a malformed id succeeded")
    except grpc.RpcError as e:
        check(e.code() == grpc.StatusCode.INVALID_ARGUMENT, f"malformed id: {e.code()} {e.details()}")
        status = rpc_status.from_call(e)
        check(status is not None, "the error carries grpc-status-details-bin")
        reasons = []
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reasons.append(info.reason)
        check(reasons and all(reasons), f"an ErrorInfo with a reason: {status}")
        print(f"error: {e.code().name} reason {reasons[0]} ({len(status.details)} details)")

    stub.UnloadRootlet(pb.UnloadRootletRequest(rootlet=ref), timeout=120)
    listed = stub.ListRootlets(pb.ListRootletsRequest(), timeout=30)
    check(not listed.rootlets, f"UnloadRootlet: none left: {listed}")
    print("ALL_OK")


if __name__ == "__main__":
    main()
