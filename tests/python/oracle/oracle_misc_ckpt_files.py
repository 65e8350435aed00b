"""Files written by save_state with model+optimizer+scheduler (accelerate 1.15.0)."""
import os, tempfile, torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
pd = tempfile.mkdtemp()
acc = Accelerator(cpu=True, project_config=ProjectConfiguration(project_dir=pd, automatic_checkpoint_naming=True))
m = torch.nn.Linear(2, 2); o = torch.optim.SGD(m.parameters(), lr=0.1); s = torch.optim.lr_scheduler.StepLR(o, 1)
m, o, s = acc.prepare(m, o, s)
print(sorted(os.listdir(acc.save_state())))
