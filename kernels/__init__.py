"""OpenCL (.cl) and CUDA (.cu) kernel sources, installed as package data."""
