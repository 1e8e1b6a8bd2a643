"""The package works with no compiled extension and no Triton: auto falls back to the reference, once, loudly."""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_without_compiled_or_triton_backends_auto_falls_back_and_warns_once():
    # A fresh interpreter where importing the extension and triton fails, as on a machine without them.
    code = textwrap.dedent("""
        import sys, warnings
        import torch  # first: CUDA builds of torch look for triton while they import
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name in ("fusedecay._C", "fusedecay._C_cuda", "triton") or name.startswith("triton."):
                    raise ImportError(f"{name} blocked for this test")
        for name in [m for m in sys.modules if m == "triton" or m.startswith("triton.")]:
            del sys.modules[name]  # torch may have imported it: make the next import look again
        sys.meta_path.insert(0, Block())
        sys.path.insert(0, sys.argv[1])
        from fusedecay import AdamHD, available_backends, backends
        # "batched" (ScionC) needs only torch; the compiled and Triton Adam backends are gone.
        assert set(available_backends()) == {"reference", "batched"}, available_backends()
        reasons = backends.unavailable_reasons()
        assert "fusedecay._cpp_backend" in reasons and "fusedecay._triton_backend" in reasons, reasons
        assert "FUSEDECAY_JIT=0" in reasons["fusedecay._cpp_backend"], reasons
        p = torch.nn.Parameter(torch.randn(5, 3))
        q = torch.nn.Parameter(p.detach().clone())
        a = AdamHD([p], lr=1e-2)
        b = AdamHD([q], lr=1e-2, backend="reference")
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            for _ in range(3):
                p.grad = torch.ones_like(p); q.grad = torch.ones_like(q)
                a.step(); b.step()
        msgs = [str(x.message) for x in w if "fusedecay" in str(x.message)]
        assert len(msgs) == 1 and "reference" in msgs[0], msgs
        assert torch.equal(p, q)
        try:
            AdamHD([p], backend="cpu").step()
        except RuntimeError as e:
            assert "not available" in str(e)
        else:
            raise AssertionError("backend='cpu' without the extension must raise")
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FUSEDECAY_JIT"] = "0"  # and no just-in-time build (tests/test_jit_build.py covers that path)
    out = subprocess.run([sys.executable, "-c", code, os.path.join(ROOT, "python")], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr
