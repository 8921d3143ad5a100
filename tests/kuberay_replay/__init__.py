"""A replay of KubeRay 1.7 on one machine: RayJobs and RayServices as the operator builds them,
run the way KubeRay runs them (see DEVELOPERS.md, "The KubeRay replay")."""
