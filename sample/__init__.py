"""The sampling scripts users run (`python sample/generate.py`, `sample/reconstruct.py`, `sample/sample_ddp.py`); a
package only so the tests can import them (`from sample import generate`)."""
